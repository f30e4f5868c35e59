"""`e2rnas sweep`: searches over resource targets, and their Pareto front.

For every resource target (and every objective set): search, retrain and
evaluate (`pipeline.search_train_evaluate`); then mark the runs that no
other run dominates in (parameters: fewer is better, clean accuracy and
robust accuracy: higher is better), draw the front, and export each
Pareto-optimal model as a version of one TF Serving model, its figures in
the version's metadata (``assets.extra/e2rnas_metadata.json``).

Layout of ``--workdir``::

    runs/<setting>/{search,train,evaluation}/
    results/sweep.md, sweep.json, pareto.png|svg, cells/
    results/exports.json     (setting -> exported version directory)

The serving model goes to ``--export_base`` (default
``<workdir>/serving``) as ``<export_base>/<model_name>/<version>/``.
A sweep run again continues, and exports only what it has not exported.
Each setting is locked while it runs and the workdir while the front is
exported and written, so settings can run as processes side by side in
one workdir (see `pipeline`).

Reference:
    https://arxiv.org/abs/2011.09820
"""

from __future__ import annotations

import os
import shlex
import time

import keras
import numpy as np

from e2rnas_tf import runtime
from e2rnas_tf.experiments import pipeline
from e2rnas_tf.runs import checkpoints as ckpt_lib
from e2rnas_tf.runs import files
from e2rnas_tf.runs import workdir as workdir_lib
from e2rnas_tf.search import resources
from e2rnas_tf.serving import export as export_lib

KINDS = ("params", "flops")


class SweepError(ValueError):
    """A bad sweep config."""


def pareto_mask(params, clean, robust):
    """Which points no other point dominates.

    Point ``j`` dominates ``i`` if it is no larger and no less accurate,
    clean and robust, and strictly better in at least one of the three.
    Equal points do not dominate each other (both stay on the front).

    Args:
        params, clean, robust: equal-length sequences of numbers.

    Returns:
        A list of bools.

    Example:

    >>> pareto_mask([1, 2, 3], [0.5, 0.7, 0.6], [0.2, 0.2, 0.1])
    [True, True, False]
    """
    p = np.asarray(params, dtype=float)
    c = np.asarray(clean, dtype=float)
    r = np.asarray(robust, dtype=float)
    if not p.shape == c.shape == r.shape or p.ndim != 1:
        raise ValueError(
            "Expected three equal-length 1-D sequences. Received shapes: "
            f"{p.shape}, {c.shape}, {r.shape}")
    no_worse = ((p[None, :] <= p[:, None]) & (c[None, :] >= c[:, None])
                & (r[None, :] >= r[:, None]))
    better = ((p[None, :] < p[:, None]) | (c[None, :] > c[:, None])
              | (r[None, :] > r[:, None]))
    # dominated[i]: some j (row i, column j) is no worse and better.
    dominated = (no_worse & better).any(axis=1)
    return [not d for d in dominated]


def _check(config):
    kind = config.resource
    if kind not in KINDS:
        raise SweepError(f"Expected config.resource in {list(KINDS)}. "
                         f"Received: {kind!r}")
    targets = tuple(config.targets)
    if not targets or len(set(targets)) != len(targets) or not all(
            isinstance(t, (int, float)) and t > 0 for t in targets):
        raise SweepError(
            "Expected config.targets to be distinct positive numbers "
            f"({kind} in the units of config.search.resource.cost_model). "
            f"Received: {targets!r}")
    constraints = [m for m in resources.CONSTRAINTS if m != "none"]
    if config.constraint not in constraints:
        raise SweepError(
            f"Expected config.constraint in {constraints}. "
            f"Received: {config.constraint!r}")
    sets = tuple(tuple(s) for s in config.objective_sets)
    if not sets or any(kind not in s for s in sets):
        raise SweepError(
            f"Expected config.objective_sets, each containing {kind!r} (the "
            f"swept resource). Received: {sets!r}")
    pipeline.check_robust(config, SweepError)
    export_lib.check_model_name(config.model_name)


def settings(config):
    """``[(name, objectives, target)]``: every search of the sweep."""
    out = []
    for objectives in config.objective_sets:
        for target in config.targets:
            name = f"{config.resource}{float(target):g}_{'-'.join(objectives)}"
            out.append((name, tuple(objectives), float(target)))
    return out


def setting_configs(config, objectives, target):
    """The search and train configs of one sweep setting."""
    search = config.search.copy_and_resolve_references()
    train = config.train.copy_and_resolve_references()
    kind = config.resource
    with search.unlocked(), train.unlocked():
        for stage in (search, train):
            pipeline.set_data_source(stage, config.data)
            stage.seed = int(config.seed)
        search.objectives = tuple(objectives)
        search.resource[f"{kind}_target"] = float(target)
        search.resource[f"{kind}_constraint"] = config.constraint
    search.lock()
    train.lock()
    return search, train


def _point(name, objectives, target, result, robust_key):
    ev = result["evaluation"]
    attack, eps = robust_key
    return {
        "name": name, "objectives": list(objectives), "target": target,
        "genotype": result["search"]["genotype"],
        "genotype_path": result["search"]["genotype_path"],
        "search_params_m": result["search"]["genotype_params_m"],
        "params_m": result["train"]["params"] / 1e6,
        "macs_m": result["train"]["macs"] / 1e6,
        "clean": ev["clean_accuracy"],
        "robust": ev["robust_accuracy"][attack][eps],
        "robust_accuracy": ev["robust_accuracy"],
        "model_path": result["train"]["model_path"],
        "seconds": result["seconds"],
    }


def format_sweep(points, meta):
    """The markdown report: one row per setting, Pareto points marked."""
    lines = [f"# e2rnas sweep ({meta['variant']})", "",
             f"- command: `{meta['command']}`",
             f"- machine: {meta['machine']}",
             f"- wall time of the runs: {meta['hours']:.2f} h",
             f"- swept: {meta['resource']} target ({meta['constraint']}), "
             f"robust accuracy = {meta['robust']}",
             f"- serving model: {meta['serving']}", "",
             "`*` = Pareto-optimal (no other run has fewer parameters and "
             "at least the clean and robust accuracy, better in one).", "",
             f"| setting | target ({meta.get('units', 'M')}) | derived "
             f"genotype's params at {meta.get('scale', '20 cells C=36')} (M)"
             " | params (M) | MACs (M) | clean acc | robust acc | Pareto "
             "| served version |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(
            f"| {p['name']} | {p['target']:g} | {p['search_params_m']:.2f} | "
            f"{p['params_m']:.3f} | {p['macs_m']:.1f} | {p['clean']:.4f} | "
            f"{p['robust']:.4f} | {'*' if p['pareto'] else ''} | "
            f"{p.get('version') or '-'} |")
    lines.append("")
    return "\n".join(lines)


# TF Serving version labels of the front: label -> (figure, best is max).
FRONT_LABELS = {"smallest": ("params_m", False),
                "most_accurate": ("clean", True),
                "most_robust": ("robust", True)}


def _export_points(points, export_base, model_name, exports_path, log):
    exports = files.read_json(exports_path) or {}
    front = sorted((p for p in points if p["pareto"]),
                   key=lambda p: p["params_m"])
    for p in front:
        previous = exports.get(p["name"])
        if previous and os.path.isdir(previous):
            continue
        model = ckpt_lib.load_model_file(p["model_path"])
        figures = {k: p[k] for k in ("name", "objectives", "target",
                                     "params_m", "macs_m", "clean",
                                     "robust", "robust_accuracy",
                                     "search_params_m")}
        run_files = export_lib.checkpoint_metadata(p["model_path"], model)
        version_dir = export_lib.export(
            model, export_base, model_name,
            metadata={"sweep": figures, "genotype": p["genotype"],
                      "pareto_optimal": True},
            class_names=run_files.get("class_names"))
        exports[p["name"]] = version_dir
        files.write_json(exports_path, pipeline.jsonable(exports),
                         sort_keys=False)
        log(f"sweep: exported {p['name']} as {version_dir}")
        keras.backend.clear_session()
    return exports


def export_front(points, export_base, model_name, exports_path, *,
                 log=print):
    """Exports every Pareto-optimal point not exported before.

    Versions are assigned in order of increasing parameters; the served
    outputs carry the class names the training run recorded. models.config
    serves every version and labels the front's extremes (`FRONT_LABELS`;
    ties: the smaller model). Returns ``{setting: version directory}``
    (also written to ``exports_path``).
    """
    # The served models compute in float32, whatever the training policy.
    with runtime.precision_policy("float32"):
        exports = _export_points(points, export_base, model_name,
                                 exports_path, log)
    front = sorted((p for p in points if p["pareto"]),
                   key=lambda p: p["params_m"])
    if front:
        labels = {}
        for label, (key, larger) in FRONT_LABELS.items():
            best = (max if larger else min)(front, key=lambda p: p[key])
            labels[label] = int(os.path.basename(exports[best["name"]]))
        export_lib.update_model_config(export_base, model_name,
                                       labels=labels)
        log(f"sweep: version labels {labels}")
    return exports


def sweep(config, workdir, *, export_base=None, overwrite=False, command="",
          log=print):
    """Runs every setting, marks the Pareto front and exports it.

    Args:
        config: a `config_lib.sweep_config()` (configs/sweep.py).
        workdir: output directory; finished stages there are reused.
        export_base: TF Serving base directory (default
            ``<workdir>/serving``).
        overwrite: rerun stages whose directories hold another config.
        command: the command line, recorded in the results.
        log: a print-like callable.

    Returns:
        ``{"points": [...], "exports": {...}, "results_dir": path}``.
    """
    _check(config)
    robust_key = (config.robust.attack, f"{float(config.robust.eps):g}")
    points = []
    runs = settings(config)
    for i, (name, objectives, target) in enumerate(runs):
        log(f"sweep: run {i + 1}/{len(runs)}: {name}")
        search_cfg, train_cfg = setting_configs(config, objectives, target)
        result = pipeline.search_train_evaluate(
            search_cfg, train_cfg, os.path.join(workdir, "runs", name),
            overwrite=overwrite, log=log)
        points.append(_point(name, objectives, target, result, robust_key))
    # Runs are locked one by one (pipeline); the front, its exports and the
    # tables under the workdir's lock.
    with workdir_lib.WorkdirLock(workdir, wait=pipeline.RESULTS_WAIT_SECONDS):
        return _front(config, workdir, points, export_base=export_base,
                      command=command, log=log)


def _front(config, workdir, points, *, export_base, command, log):
    from e2rnas_tf import plots
    from e2rnas_tf.space import genotypes as genotypes_lib

    export_base = export_base or os.path.join(workdir, "serving")
    mask = pareto_mask([p["params_m"] for p in points],
                       [p["clean"] for p in points],
                       [p["robust"] for p in points])
    for p, front in zip(points, mask):
        p["pareto"] = bool(front)

    results_dir = os.path.join(workdir, "results")
    os.makedirs(results_dir, exist_ok=True)
    exports = export_front(points, export_base, config.model_name,
                           os.path.join(results_dir, "exports.json"), log=log)
    for p in points:
        p["version"] = (os.path.basename(exports[p["name"]])
                        if p["name"] in exports else None)
    robust_label = (f"{config.robust.attack.upper()} "
                    f"{float(config.robust.eps):g}/255 accuracy")
    for ext in ("png", "svg"):
        plots.plot_pareto(points, os.path.join(results_dir, f"pareto.{ext}"),
                          robust_label=robust_label)
    for p in points:
        plots.plot_genotype(genotypes_lib.Genotype.from_dict(p["genotype"]),
                            os.path.join(results_dir, "cells"),
                            prefix=p["name"])
    meta = {"variant": config.variant,
            "command": command or "e2rnas sweep",
            "machine": pipeline.describe_machine(),
            "hours": sum(p["seconds"] for p in points) / 3600,
            "resource": config.resource, "constraint": config.constraint,
            "units": (f"{config.search.resource.cost_model} model, "
                      f"{config.search.resource.estimate}"),
            "scale": (f"{config.search.resource.layers} cells "
                      f"C={config.search.resource.channels}"),
            "robust": robust_label,
            "serving": os.path.join(os.path.abspath(export_base),
                                    config.model_name)}
    files.write_json(os.path.join(results_dir, "sweep.json"),
                     pipeline.jsonable({"meta": meta, "points": points}),
                     sort_keys=False)
    files.write_text(os.path.join(results_dir, "sweep.md"),
                     format_sweep(points, meta))
    log(f"sweep: results in {results_dir}/sweep.md; Pareto-optimal: "
        f"{[p['name'] for p in points if p['pareto']]}")
    return {"points": points, "exports": exports, "results_dir": results_dir}


def main(config, args):
    """``e2rnas sweep --config=configs/sweep.py[:cpu|tiny] --workdir=DIR
    [--export_base=DIR] [--model_name=NAME]``."""
    if not args.workdir:
        raise SweepError("Expected --workdir=DIR for the runs and results")
    config = config.copy_and_resolve_references()
    if args.model_name and args.model_name != "e2rnas":
        with config.unlocked():
            config.model_name = args.model_name
    start = time.perf_counter()
    result = sweep(config, args.workdir, export_base=args.export_base,
                   overwrite=args.overwrite,
                   command=shlex.join(args.command_line
                                      or ("e2rnas", "sweep")),
                   log=lambda *a: print(*a, flush=True))
    with open(os.path.join(result["results_dir"], "sweep.md")) as f:
        print(f.read())
    print(f"sweep: {time.perf_counter() - start:.0f} s")
    return 0
