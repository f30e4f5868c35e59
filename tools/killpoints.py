"""Kill-point fuzzer: SIGKILL a run anywhere, resume it, compare every file.

For each run kind (``--kind search``, ``train`` or ``both``) the fuzzer runs
a tiny deterministic run (``config.deterministic=True``, a checkpoint after
every step) to completion twice: the reference, and a second uninterrupted
run that must give the same files (otherwise the comparison would mean
nothing, and the tool exits 1 before killing anything). Then, for each kill
point, it starts the same command in a fresh workdir, SIGKILLs it:

- ``boundary N``: as soon as ``checkpoints/checkpoint_ok.json`` lists step
  N, for every step of the run (the kill lands in the work right after a
  checkpoint: the next step, or an epoch's end: its alpha snapshot,
  genotype, evaluation and metrics line);
- ``mid-write N``: as soon as a file of checkpoint N exists and the manifest
  does not list it yet (during the checkpoint's write and verification);
- ``start-up T`` (``--startup`` of the ``--random`` kills): T seconds
  after the start, T uniform over the start-up (data, building,
  compilation: before the first metrics line);
- ``random F``: at fraction F (uniform in [0, 1]) of the stepping time
  (first metrics line to the end, the final writes included), timed from
  the run's own first metrics line, the stepping time measured on the
  second uninterrupted run;

runs the same command again to completion, and compares the resumed
workdir with the reference, file by file:

- byte for byte, except: ``checkpoints/`` (a resumed run keeps other
  checkpoints), ``tb/`` (TensorBoard event files hold wall times) and the
  lock file ``.e2rnas.lock`` (its owner's pid);
- ``metrics.jsonl`` and JSON files record by record without the wall-clock
  fields `WALL_CLOCK_FIELDS`;
- ``.keras`` files member by member (config, weights, and Keras' metadata
  without its save date; not the zip's entry times);
- the workdir's own path, where a file names it, counts as equal.

A kill point whose run finished before the kill is reported, not counted;
a random one is then drawn again at an earlier fraction (at most
``--random`` redraws), so that the random kills land although the machine's
speed varies.
Prints a table (markdown); exits 0 when every kill point resumed to
identical files, 1 otherwise, 2 on bad arguments.

    python tools/killpoints.py --kind both --random 20

takes about an hour on 2 CPU cores (each kill point is a killed run and a
resumed one, each compiling its step).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]

# The fields of the fuzzed runs' files that measure or stamp time, not
# computation: train's epoch lines in ``metrics.jsonl``, and Keras'
# ``metadata.json`` inside a ``.keras`` file. (A search writes none.)
WALL_CLOCK_FIELDS = frozenset({"train_seconds", "date_saved"})
# Skipped whole: what a resumed run legitimately writes differently.
SKIPPED = ("checkpoints", "tb", ".e2rnas.lock")
MANIFEST = "checkpoint_ok.json"

_TINY_SEARCH = (
    "--config=configs/search_demo.py", "--config.model.layers=3",
    "--config.model.channels=4", "--config.data.image_size=8",
    "--config.batch_size=8", "--config.data.num_train=96",
    "--config.data.num_test=16", "--config.eval_batch_size=16",
    "--config.resource.layers=5", "--config.resource.channels=8",
    "--config.epochs=2", "--config.steps_per_epoch=3",
    "--config.checkpoint_every=1", "--config.deterministic=True")
_TINY_TRAIN = (
    "--config=configs/train_demo.py", "--config.genotype=DARTS_V2",
    "--config.data.image_size=8", "--config.data.num_train=96",
    "--config.data.num_test=16", "--config.data.cutout=4",
    "--config.model.layers=3", "--config.model.channels=4",
    "--config.model.drop_path=0.2", "--config.batch_size=8",
    "--config.eval_batch_size=16", "--config.epochs=2",
    "--config.steps_per_epoch=3", "--config.checkpoint_every=1",
    "--config.deterministic=True")
TINY_FLAGS = {"search": _TINY_SEARCH, "train": _TINY_TRAIN}
TOTAL_STEPS = {"search": 6, "train": 6}


def command(kind, workdir):
    """The tiny deterministic ``kind`` run writing into ``workdir``."""
    return [sys.executable, "-m", "e2rnas_tf", kind, *TINY_FLAGS[kind],
            f"--workdir={workdir}"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                PYTHONPATH=str(REPO) + os.pathsep
                + os.environ.get("PYTHONPATH", ""))


# ---------------------------------------------------------------------------
# Comparing two workdirs.

def _files(root):
    root = pathlib.Path(root)
    out = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIPPED or not path.is_file():
            continue
        out.add(rel.as_posix())
    return out


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()
                if k not in WALL_CLOCK_FIELDS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _normalised(path, root):
    """A file's content for comparison: bytes, with the workdir's path
    replaced; JSON and JSON lines parsed, wall-clock fields dropped; a
    ``.keras`` file member by member (the zip's own entry times are not
    compared)."""
    data = pathlib.Path(path).read_bytes()
    data = data.replace(os.fsencode(os.path.abspath(root)), b"<workdir>")
    return _content(os.path.basename(path), data)


def _content(name, data):
    if name.endswith(".keras"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return {member: _content(member, archive.read(member))
                        for member in archive.namelist()}
        except zipfile.BadZipFile:
            return data  # compared as bytes: a damaged file differs
    try:
        if name.endswith(".jsonl"):
            return [_strip(json.loads(line))
                    for line in data.decode().splitlines()]
        if name.endswith(".json"):
            return _strip(json.loads(data.decode()))
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass  # compared as bytes: a damaged file differs
    return data


def _first_difference(a, b):
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                keys = (sorted(k for k in set(x) | set(y)
                               if x.get(k) != y.get(k))
                        if isinstance(x, dict) and isinstance(y, dict)
                        else None)
                return f"line {i + 1} differs" + (f" ({', '.join(keys)})"
                                                  if keys else "")
        return f"{len(a)} lines vs {len(b)}"
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"differ: {', '.join(keys)}"
    return "bytes differ"


def compare_runs(reference, other):
    """Differences between two workdirs (see the module), as one line each;
    [] when they hold the same results."""
    ref_files, other_files = _files(reference), _files(other)
    problems = [f"missing {f}" for f in sorted(ref_files - other_files)]
    problems += [f"extra {f}" for f in sorted(other_files - ref_files)]
    for rel in sorted(ref_files & other_files):
        a = _normalised(os.path.join(reference, rel), reference)
        b = _normalised(os.path.join(other, rel), other)
        if a != b:
            problems.append(f"{rel}: {_first_difference(a, b)}")
    return problems


# ---------------------------------------------------------------------------
# Running and killing.

def _manifest_steps(workdir):
    try:
        manifest = json.loads((pathlib.Path(workdir) / "checkpoints" /
                               MANIFEST).read_text())
        return {c["step"] for c in manifest["checkpoints"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _checkpoint_files(workdir, step):
    return bool(list((pathlib.Path(workdir) / "checkpoints")
                     .glob(f"ckpt-{step}.*")))


def _has_metrics(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return path.exists() and path.stat().st_size > 0


def run_to_end(kind, workdir, timeout=900):
    """Runs the tiny ``kind`` run to completion; returns (seconds, time of
    its first metrics line or None)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command(kind, workdir), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first_line = None
    while proc.poll() is None:
        if first_line is None and _has_metrics(workdir):
            first_line = time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            proc.kill()
            raise RuntimeError(f"{kind} run timed out after {timeout} s")
        time.sleep(0.01)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run in {workdir} failed "
                           f"({proc.returncode}): {err.strip()[-1500:]}")
    return time.perf_counter() - start, first_line


@dataclasses.dataclass
class KillPoint:
    """Where to kill: ``kind`` "boundary" or "mid-write" of checkpoint
    ``value``; "start-up", ``value`` seconds after the start; "random", at
    fraction ``value`` of the stepping time ``span`` (seconds from the run's
    own first metrics line)."""

    kind: str
    value: float
    span: float = 0.0

    @property
    def label(self):
        if self.kind == "start-up":
            return f"start-up {self.value:.1f} s"
        if self.kind == "random":
            return (f"random {self.value:.2f} of the steps "
                    f"({self.value * self.span:.1f} s)")
        return f"{self.kind} {int(self.value)}"

    def reached(self, workdir, elapsed, first_line):
        """``first_line``: when this run wrote its first metrics line (None
        before it has)."""
        if self.kind == "boundary":
            return int(self.value) in _manifest_steps(workdir)
        if self.kind == "mid-write":
            return (_checkpoint_files(workdir, int(self.value))
                    and int(self.value) not in _manifest_steps(workdir))
        if self.kind == "start-up":
            return elapsed >= self.value
        return (first_line is not None
                and elapsed - first_line >= self.value * self.span)


def kill_at(kind, workdir, point, timeout=900):
    """Starts the run, SIGKILLs it at ``point``; returns the last step its
    manifest listed at the kill, or None if the run finished first."""
    start = time.perf_counter()
    proc = subprocess.Popen(command(kind, workdir), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first_line = None
    try:
        while proc.poll() is None:
            elapsed = time.perf_counter() - start
            if first_line is None and _has_metrics(workdir):
                first_line = elapsed
            if point.reached(workdir, elapsed, first_line):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return max(_manifest_steps(workdir), default=0)
            if elapsed > timeout:
                raise RuntimeError(f"{kind} run timed out after {timeout} s")
            time.sleep(0.002)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_points(kind, seconds, first_line, n_random, n_startup, rng):
    """Every checkpoint boundary, a write in progress of a few checkpoints,
    ``n_startup`` instants in the start-up (before the first metrics line
    at ``first_line`` seconds) and ``n_random - n_startup`` at random
    fractions of the stepping (``seconds - first_line``, the final writes
    included), timed from each run's own first metrics line."""
    steps = TOTAL_STEPS[kind]
    points = [KillPoint("boundary", s) for s in range(1, steps + 1)]
    points += [KillPoint("mid-write", s)
               for s in sorted({1, steps // 2, steps})]
    n_startup = min(n_startup, n_random)
    points += [KillPoint("start-up", rng.uniform(0.5, first_line))
               for _ in range(n_startup)]
    span = seconds - first_line
    points += [KillPoint("random", rng.uniform(0.0, 1.0), span)
               for _ in range(n_random - n_startup)]
    return points


def fuzz(kind, root, n_random, n_startup, seed, log=print):
    """The fuzzing of one run kind; returns (rows, summary)."""
    root = pathlib.Path(root) / kind
    root.mkdir(parents=True, exist_ok=True)
    reference = root / "reference"
    seconds, first_line = run_to_end(kind, reference)
    log(f"{kind}: reference in {seconds:.0f} s (first metrics line at "
        f"{first_line or 0:.0f} s)")
    # The rerun, just before the kills, also times them.
    seconds, first_line = run_to_end(kind, root / "rerun")
    problems = compare_runs(reference, root / "rerun")
    if problems:
        raise RuntimeError(f"two uninterrupted {kind} runs differ, so a "
                           f"comparison would mean nothing: {problems[:5]}")
    shutil.rmtree(root / "rerun")
    rows = []
    rng = random.Random(seed)
    queue = kill_points(kind, seconds, first_line or 0.0, n_random,
                        n_startup, rng)
    redraws = n_random
    while queue:
        point = queue.pop(0)
        workdir = root / f"kill_{len(rows):02d}"
        step = kill_at(kind, workdir, point)
        if step is None:
            rows.append((kind, point.label, "-", "finished before the kill"))
            shutil.rmtree(workdir, ignore_errors=True)
            log(f"{kind}: {point.label}: finished before the kill")
            if point.kind == "random" and redraws:
                # The run went faster than the rerun: an earlier fraction.
                redraws -= 1
                queue.insert(0, KillPoint(
                    "random", rng.uniform(0.0, point.value), point.span))
            continue
        try:
            run_to_end(kind, workdir)
            problems = compare_runs(reference, workdir)
        except RuntimeError as e:
            problems = [f"resume failed: {e}"]
        outcome = "identical" if not problems else "; ".join(problems[:3])
        rows.append((kind, point.label, str(step), outcome))
        log(f"{kind}: {point.label} (checkpointed step {step}): {outcome}")
        if not problems:
            shutil.rmtree(workdir)
    tried = [r for r in rows if r[3] != "finished before the kill"]
    same = sum(r[3] == "identical" for r in tried)
    return rows, (kind, len(tried), same, len(tried) - same,
                  len(rows) - len(tried))


def table(summaries, rows):
    """The markdown report: a summary per run kind, then every kill point."""
    lines = ["| run | kill points | identical | differ | finished first |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {n} | {same} | {diff} | {first} |"
              for k, n, same, diff, first in summaries]
    lines += ["", "| run | kill point | last checkpoint | result |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {p} | {s} | {o} |" for k, p, s, o in rows]
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--kind", choices=("search", "train", "both"),
                        default="both")
    parser.add_argument("--random", type=int, default=20,
                        help="random kill instants per run kind")
    parser.add_argument("--startup", type=int, default=2,
                        help="how many of them fall in the start-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="where the runs go (default: a temporary "
                             "directory, removed at the end)")
    parser.add_argument("--out", default=None,
                        help="also write the table to this file")
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    if args.random < 0 or args.startup < 0:
        print("killpoints: error: --random and --startup must be >= 0",
              file=sys.stderr)
        return 2
    if args.workdir and os.path.exists(args.workdir) \
            and os.listdir(args.workdir):
        print(f"killpoints: error: {args.workdir} is not empty; choose a "
              "new --workdir", file=sys.stderr)
        return 2
    root = args.workdir or tempfile.mkdtemp(prefix="killpoints-")
    kinds = ("search", "train") if args.kind == "both" else (args.kind,)
    summaries, rows = [], []
    try:
        for kind in kinds:
            kind_rows, summary = fuzz(kind, root, args.random, args.startup,
                                      args.seed, log=lambda s: print(
                                          s, flush=True))
            rows += kind_rows
            summaries.append(summary)
    except RuntimeError as e:
        print(f"killpoints: error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    report = table(summaries, rows)
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report + "\n")
    return 0 if all(s[3] == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
