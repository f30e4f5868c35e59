"""Runs a matrix of `tools/benchmark.py` cells and writes a markdown table.

Each cell (config x workload x XLA x precision x devices) runs in a FRESH
subprocess, one after the other, so that peak-memory figures and caches
never mix between cells, with a per-cell timeout (the child's process
group is killed). Every cell gets a row, including those that fail, time
out or that the project refuses (a ValueError from the project, e.g. an
unknown genotype), with a one-line reason.

Outputs in ``--out``: ``results.jsonl`` (one JSON line per cell, from the
child or, if it died, from this driver), ``table.md`` (rewritten after
every cell, so a partial matrix is readable) and ``logs/<cell>.log`` (the
child's stdout and stderr).

Usage (a quiet machine; 2 threads as the project's CPU figures). The whole
matrix (64 cells, default 30 min timeout) is estimated at about 4 h on
the 2-core development machine (from single cells timed there under
load), 2 h of it the four A-size XLA search cells timing out (one XLA
search step at A took 544 s after a 1056 s first step, at 14 GiB RSS).
Run it in parts, all into one table (add ``--skip-done`` to resume an
interrupted part)::

    python tools/benchmark_matrix.py --out runs/bench_matrix --configs C
    python tools/benchmark_matrix.py --out runs/bench_matrix --configs A \\
        --xla off
    python tools/benchmark_matrix.py --out runs/bench_matrix --configs A \\
        --xla on --workloads train,pgd
    # optional, one step each (the rows say n=1):
    python tools/benchmark_matrix.py --out runs/bench_matrix --configs A \\
        --xla on --workloads search1,search2 --steps 1 --warmup 0 \\
        --timeout 3600
    python tools/benchmark_matrix.py --dry-run   # list the cells
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

import benchmark  # noqa: E402  (the sibling tool: axes and validation)

KEY_FIELDS = ("config", "workload", "xla", "precision", "devices")
DONE = ("ok", "refused")


def _split(text, allowed, name, cast=str):
    values = [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad or len(set(values)) != len(values):
        raise ValueError(
            f"Expected --{name} as distinct comma-separated values from "
            f"{list(allowed)}. Received: {name}={text!r}")
    return values


def cells(configs, workloads, xla, precisions, devices):
    """The matrix as a list of cell dicts, cheapest groups first.

    Cells run config by config in the given order, XLA off before on, so
    that the quick rows arrive first and an XLA compile that times out
    comes last.

    Args:
        configs: sizes among ``A``, ``C`` (``B`` is ``A`` + ``search2``).
        workloads, xla, precisions, devices: values of each axis.

    Returns:
        A list of dicts with the keys of `KEY_FIELDS`.
    """
    if "B" in configs:
        raise ValueError(
            "Expected --configs among A, C (B is A with workload search2). "
            f"Received: configs={list(configs)}")
    order = sorted(xla, key=lambda v: v != "off")
    return [dict(config=c, workload=w, xla=x, precision=p, devices=d)
            for c in configs for x in order for w in workloads
            for p in precisions for d in devices]


def cell_key(record):
    return tuple(record.get(k) for k in KEY_FIELDS)


def cell_name(cell):
    return "{config}_{workload}_xla-{xla}_{precision}_{devices}dev".format(
        **cell)


def cell_args(cell, args, json_path):
    """Command-line arguments of `tools/benchmark.py` for one cell."""
    return ["--config", cell["config"], "--workload", cell["workload"],
            "--xla", cell["xla"], "--precision", cell["precision"],
            "--devices", str(cell["devices"]), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--genotype", args.genotype, "--json", json_path]


def read_records(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _last_line(path):
    """The last informative line of a child's log, for a failure reason."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    # TF's C++ log lines ("I0000 ...", "W0000 ...") say nothing about why.
    lines = [ln for ln in lines if not ln[:1] in "IWE" or not ln[1:5].isdigit()]
    return lines[-1][:200] if lines else ""


def _stage(path):
    """Where a killed child was, from the progress lines it printed."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return "unknown stage"
    if "s/step:" in text:
        return "after the timed steps (FLOP count or matmul)"
    if "time to first step" in text:
        return "in the warm-up / timed steps"
    if "set-up:" in text:
        return "in the first step (trace + compile)"
    return "in set-up"


def run_cell(cell, args, json_path, log_dir):
    """Runs one cell in a fresh process; returns its record.

    The child appends its own record to ``json_path`` (ok, refused, or a
    Python exception); if it dies without one (timeout, killed by the OOM
    killer, a crash in TensorFlow's C++), the driver writes it.
    """
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, cell_name(cell) + ".log")
    before = len(read_records(json_path))
    cmd = [sys.executable, os.path.join(TOOLS, "benchmark.py")] + \
        cell_args(cell, args, json_path)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO, env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        # Its own session, so a timeout kills the child's whole group.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        timed_out = False
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    wall = time.perf_counter() - start
    records = read_records(json_path)
    if len(records) > before:
        record = records[-1]
        record["wall_s"] = wall
        return record
    record = dict(cell, status="timeout" if timed_out else "failed",
                  wall_s=wall, log=log_path,
                  command="python tools/benchmark.py " + " ".join(
                      cell_args(cell, args, json_path)))
    if timed_out:
        record["reason"] = (f"killed after the {args.timeout:g} s timeout, "
                            f"{_stage(log_path)}")
    else:
        signal_note = (f" (signal {-code}, e.g. the OOM killer)"
                       if code < 0 else "")
        record["reason"] = (f"exit {code}{signal_note}: "
                            f"{_last_line(log_path)}")
    benchmark.append_json(json_path, record)
    return record


def table_rows(records):
    """The latest record of each cell, in the full matrix's order.

    Several invocations (e.g. a subset re-run with other ``--steps``) may
    write to one ``results.jsonl``: a later record of a cell replaces an
    earlier one, and the table shows every cell seen.
    """
    latest = {}
    for r in records:
        latest[cell_key(r)] = r
    order = {cell_key(c): i for i, c in enumerate(cells(
        ["C", "A"], benchmark.WORKLOADS, benchmark.XLA,
        benchmark.PRECISIONS, benchmark.DEVICES))}
    return sorted(latest.values(),
                  key=lambda r: order.get(cell_key(r), len(order)))


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def format_table(records):
    """A markdown table with one row per record (any status).

    Args:
        records: dicts as written by `tools/benchmark.py` (or by
            `run_cell` for a dead child): the `KEY_FIELDS`, ``status``,
            ``reason`` and, for ``ok`` rows, the measured figures.

    Returns:
        The table as a string, header included, ending in a newline.
    """
    header = ["config", "workload", "XLA", "precision", "devices", "status",
              "s/step (min)", "img/s", "first step s", "peak RSS GiB",
              "TF peak GiB", "GFLOP/step", "GFLOP/s", "% of matmul peak",
              "load start/end", "note"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for r in records:
        ok = r.get("status") == "ok"
        step = (f"{r['step_s']:.3f} ({r['step_s_min']:.3f}) "
                f"n={r.get('steps', '?')}"
                if ok and r.get("step_s") is not None else "")
        flops = r.get("flops_per_step")
        frac = r.get("peak_fraction")
        load = ""
        if r.get("load_start") is not None:
            end = r.get("load_end", float("nan"))
            load = f"{r['load_start']:.1f}/{end:.1f}"
        note = r.get("reason") if not ok else r.get("note", "")
        note = str(note or "").replace("|", "\\|").replace("\n", " ")
        row = [r.get("config", ""), r.get("workload", ""), r.get("xla", ""),
               r.get("precision", ""), str(r.get("devices", "")),
               r.get("status", ""), step,
               _fmt(r.get("images_per_s") if ok else None, ".2f"),
               _fmt(r.get("first_step_s") if ok else None, ".1f"),
               _fmt(r.get("peak_rss_gib") if ok else None, ".2f"),
               _fmt(r.get("tf_peak_gib") if ok else None, ".3f"),
               _fmt(flops / 1e9 if ok and flops else None, ".2f"),
               _fmt(r.get("gflops_per_s") if ok else None, ".2f"),
               _fmt(100 * frac if ok and frac is not None else None, ".1f"),
               load, note]
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(path, records, preamble=""):
    text = preamble + format_table(records)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _preamble(args, records):
    peaks = sorted(r["matmul_peak_gflops"] for r in records
                   if r.get("matmul_peak_gflops"))
    peak = (f"float32 matmul peak {peaks[len(peaks) // 2]:.1f} GFLOP/s "
            f"(median over cells, {peaks[0]:.1f}-{peaks[-1]:.1f})"
            if peaks else "no matmul peak measured yet")
    threads = args.threads or "TF default"
    return (f"Last command: `python tools/benchmark_matrix.py "
            f"{' '.join(args.argv)}` (each row's own command is in "
            f"results.jsonl)\n\n"
            f"Each cell a fresh process; s/step: median (min) of n timed "
            f"steps after {args.warmup} warm-up; {threads} threads; "
            f"per-cell timeout {args.timeout:g} s; {peak}. FLOPs: "
            "conv/depthwise/matmul forward and backprop kernels that run, "
            "2 per multiply-add (tools/benchmark.py).\n\n")


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_matrix")
    parser.add_argument("--configs", default="C,A")
    parser.add_argument("--workloads", default=",".join(benchmark.WORKLOADS))
    parser.add_argument("--xla", default="off,on")
    parser.add_argument("--precision", default=",".join(benchmark.PRECISIONS))
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--genotype", default="E2RNAS")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds per cell before its process is killed")
    parser.add_argument("--skip-done", action="store_true",
                        help="skip cells already ok/refused in results.jsonl")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the cells' commands and exit")
    return parser


def parse_args(argv=None):
    """Parses and validates the driver's arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.cells = cells(
            _split(args.configs, ("A", "C"), "configs"),
            _split(args.workloads, benchmark.WORKLOADS, "workloads"),
            _split(args.xla, benchmark.XLA, "xla"),
            _split(args.precision, benchmark.PRECISIONS, "precision"),
            _split(args.devices, benchmark.DEVICES, "devices", int))
        for name, minimum in (("steps", 1), ("warmup", 0), ("threads", 0)):
            if getattr(args, name) < minimum:
                raise ValueError(
                    f"Expected --{name} >= {minimum}. Received: "
                    f"{name}={getattr(args, name)}")
        if not args.timeout > 0:
            raise ValueError(f"Expected --timeout > 0. Received: "
                             f"timeout={args.timeout}")
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    json_path = os.path.join(args.out, "results.jsonl")
    table_path = os.path.join(args.out, "table.md")
    log_dir = os.path.join(args.out, "logs")
    if args.dry_run:
        for cell in args.cells:
            print("python tools/benchmark.py " + " ".join(
                cell_args(cell, args, json_path)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    done = {cell_key(r) for r in read_records(json_path)
            if r.get("status") in DONE} if args.skip_done else set()
    todo = [c for c in args.cells if cell_key(c) not in done]
    print(f"{len(todo)} cells to run ({len(args.cells) - len(todo)} done); "
          f"results in {json_path}, table in {table_path}", flush=True)
    for i, cell in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {cell_name(cell)} ...", flush=True)
        record = run_cell(cell, args, json_path, log_dir)
        summary = (f"{record['step_s']:.3f} s/step, "
                   f"{record['images_per_s']:.2f} img/s"
                   if record.get("status") == "ok"
                   else record.get("reason", ""))
        print(f"    {record.get('status')} in {record['wall_s']:.0f} s: "
              f"{summary}", flush=True)
        rows = table_rows(read_records(json_path))
        write_table(table_path, rows, _preamble(args, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
