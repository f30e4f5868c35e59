"""`e2rnas reproduce`: the paper's comparison, at a scale of one's choosing.

For every method and seed: search (`e2rnas search`), retrain the found
genotype (`e2rnas train`), evaluate it (`e2rnas evaluate`: clean, FGSM and
PGD accuracy, parameters and multiply-adds), then a table of means and
spreads per method, the cells' diagrams and a trade-off plot.

Methods (Yue et al. 2020, Table 1 and the ablation of Section 4), each a
change of ``config.search`` (`method_configs`):

- ``darts``: accuracy only (validation cross-entropy), as DARTS.
- ``e2rnas``: ``config.search`` as it is, MGDA (ours: its objectives,
  resource estimate and target).
- ``equal``: the same objectives with equal weights 1/K instead of MGDA.
- ``published``: the algorithm of the authors' run behind the published
  genotype (`config_lib.set_e2rnas_published`) at ``config.search``'s scale.
- ``nomgda``: ``published`` with weight 1 on every raw loss (the authors'
  "noMGDA" ablation).
- ``v1``: the first version's algorithm (`config_lib.set_e2rnas_v1`).

Everything else (data, budgets, optimisers, scale) is the same for all,
from `configs/reproduce.py`; results.md lists each method's settings.

Layout of ``--workdir``::

    runs/<method>_s<seed>/{search,train,evaluation}/   (see pipeline.py)
    results/results.md, results.json, cells/*.png|svg, tradeoff.png|svg

Each run is locked while it runs and the results while they are written,
not the whole workdir: seeds (or methods) can run as processes side by side
in one workdir (``--config.seeds='(0,)'`` in one, ``'(1,)'`` in another),
and a last invocation with every seed reuses their runs and writes the
tables.

Reference:
    https://arxiv.org/abs/2011.09820
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import shlex
import time

from e2rnas_tf import config_lib
from e2rnas_tf.experiments import pipeline
from e2rnas_tf.runs import files
from e2rnas_tf.runs import workdir as workdir_lib

METHODS = {
    "darts": "DARTS (accuracy only)",
    "e2rnas": "E2RNAS (ours)",
    "equal": "E2RNAS, equal weights",
    "published": "E2RNAS as the authors ran it",
    "nomgda": "E2RNAS as the authors ran it, noMGDA",
    "v1": "E2RNAS, first version's code",
}

# (record field, table header, format): the figures of every run; the
# robust accuracies follow, one column per attack and eps the runs were
# evaluated at (`columns`).
BASE_COLUMNS = (
    ("search_params_m", "cell's params at 20 cells C=36 (M)", "{:.2f}"),
    ("params_m", "params (M)", "{:.3f}"),
    ("macs_m", "MACs (M)", "{:.1f}"),
    ("clean", "clean acc", "{:.4f}"),
)


def columns(records):
    """`BASE_COLUMNS`, then ``<attack>_<eps>`` for every attack and eps in
    the records' evaluations (attacks by name, eps ascending)."""
    robust = {}
    for r in records:
        for attack, eps in r.get("robust_fields", ()):
            robust[(attack, eps)] = None
    keys = sorted(robust, key=lambda k: (k[0], float(k[1])))
    return BASE_COLUMNS + tuple(
        (f"{attack}_{eps}", f"{attack.upper()} {eps}/255", "{:.4f}")
        for attack, eps in keys)


class ReproduceError(ValueError):
    """A bad reproduce config."""


def _check(config):
    methods = tuple(config.methods)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ReproduceError(
            f"Expected config.methods to be distinct names from "
            f"{list(METHODS)}. Received: {methods!r}")
    seeds = tuple(config.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(
            isinstance(s, int) and s >= 0 for s in seeds):
        raise ReproduceError(
            "Expected config.seeds to be distinct integers >= 0. "
            f"Received: {seeds!r}")
    pipeline.check_robust(config, ReproduceError)


def method_configs(config, method, seed):
    """The search and train configs of one (method, seed) run."""
    search = config.search.copy_and_resolve_references()
    train = config.train.copy_and_resolve_references()
    with search.unlocked(), train.unlocked():
        pipeline.set_data_source(search, config.data)
        pipeline.set_data_source(train, config.data)
        search.seed = int(seed)
        train.seed = int(seed)
        if method == "darts":
            search.objectives = ("acc",)
        elif method == "equal":
            search.combine.method = "sum"
        elif method == "e2rnas":
            search.combine.method = "mgda"
        elif method in ("published", "nomgda"):
            config_lib.set_e2rnas_published(search)
            if method == "nomgda":
                search.combine.method = "ones"
        else:
            config_lib.set_e2rnas_v1(search)
    search.lock()
    train.lock()
    return search, train


@functools.lru_cache(maxsize=4)
def _published_scale_table(num_classes, steps, multiplier):
    # The scale papers quote cells at (DARTS, E2RNAS): 20 cells, C=36, 32x32.
    from e2rnas_tf.search import resources

    return resources.measured_table(
        "params", channels=36, layers=20, num_classes=num_classes,
        image_size=32, steps=steps, multiplier=multiplier)


def cell_params_m(genotype, num_classes):
    """Parameters (millions) of a genotype as a 20-cell, C=36 network: one
    yardstick for every method, whatever scale its objectives used."""
    from e2rnas_tf.search import resources
    from e2rnas_tf.space import genotypes as genotypes_lib

    g = genotypes_lib.Genotype.from_dict(genotype)
    weights = resources.genotype_weights(g)
    table = _published_scale_table(int(num_classes), g.steps,
                                   len(g.normal_concat))
    return float(resources.expected_cost(*weights, table))


def describe_method(search):
    """One line of a method's search settings, for results.md."""
    r = search.resource
    objectives = list(search.objectives)
    parts = [f"objectives {'+'.join(objectives)}",
             f"{search.combine.method}"
             + (f" ({search.combine.normalization}, applied to "
                f"{search.combine.apply_to}, {search.combine.solver} solver)"
                if len(objectives) > 1 else ""),
             f"{search.arch.order} order"
             + (f", alpha frozen for {search.arch.warmup_epochs} warm-up "
                f"epoch(s)" if search.arch.warmup_epochs else "")]
    for kind in ("params", "flops"):
        if kind in objectives:
            parts.append(
                f"{kind}: {r.cost_model} model at {r.layers} cells C="
                f"{r.channels}, {r.estimate}, {r[kind + '_constraint']} "
                f"{r[kind + '_target']:g}")
    if "ood" in objectives or search.ood.lower_weight:
        parts.append(f"ood: {search.ood.name} (upper x"
                     f"{search.ood.upper_scale:g}, lower weight "
                     f"{search.ood.lower_weight:g})")
    if search.adv_train.enabled:
        parts.append("adversarial training "
                     f"({search.adv_train.attack.name} "
                     f"{search.adv_train.attack.eps:g}/255)")
    return "; ".join(parts)


def run_record(method, seed, result):
    """One run's figures as a flat dict (see `columns`)."""
    ev = result["evaluation"]
    robust = ev.get("robust_accuracy", {})
    record = {
        "method": method, "seed": int(seed), "name": f"{method} s{seed}",
        "genotype": result["search"]["genotype"],
        "search_params_m": cell_params_m(
            result["search"]["genotype"],
            result["train"].get("num_classes", 10)),
        "params_m": result["train"]["params"] / 1e6,
        "macs_m": result["train"]["macs"] / 1e6,
        "image_size": result["train"].get("image_size"),
        "clean": ev["clean_accuracy"],
        "train_last_accuracy": result["train"].get("last_accuracy"),
        "num_examples": ev.get("num_examples"),
        "seconds": result["seconds"],
    }
    record["robust_fields"] = []
    for attack, per_eps in robust.items():
        for eps, accuracy in per_eps.items():
            record[f"{attack}_{eps}"] = accuracy
            record["robust_fields"].append([attack, eps])
    return record


def _mean_sd(values):
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def summarize(records, methods):
    """Per method: ``{field: (mean, sample sd, n)}`` over its seeds."""
    summary = {}
    for method in methods:
        rows = [r for r in records if r["method"] == method]
        summary[method] = {}
        for field, _, _ in columns(records):
            mean, sd = _mean_sd(r.get(field) for r in rows)
            summary[method][field] = {"mean": mean, "sd": sd, "n": len(rows)}
    return summary


def _cell(stat, fmt):
    if stat["mean"] is None:
        return "-"
    text = fmt.format(stat["mean"])
    if stat["sd"] is not None:
        text += " ± " + fmt.format(stat["sd"])
    return text


def format_results(records, summary, meta):
    """The markdown report: settings, means ± sd, and every run."""
    lines = [f"# e2rnas reproduce ({meta['variant']})", ""]
    lines += [f"- command: `{meta['command']}`",
              f"- machine: {meta['machine']}",
              f"- wall time of the runs: {meta['hours']:.2f} h "
              f"(sum of the stages' times; {meta['runs']} runs)",
              f"- data: {meta['data']}",
              f"- finished: {meta['finished']}", ""]
    lines += ["Mean ± sample standard deviation over seeds "
              f"({', '.join(str(s) for s in meta['seeds'])}). Accuracies on "
              f"{meta['num_examples']} test images; MACs of one "
              f"{meta['image_size']}x{meta['image_size']} inference; the "
              "retrained networks are "
              f"{meta['train_scale']}.", ""]
    if meta.get("methods"):
        lines += ["Methods (search settings):", ""]
        lines += [f"- **{METHODS[m]}** (`{m}`): {text}"
                  for m, text in meta["methods"].items()]
        lines.append("")
    cols = columns(records)
    header = ["method", "n"] + [h for _, h, _ in cols]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for method, stats in summary.items():
        n = next(iter(stats.values()))["n"]
        lines.append("| " + " | ".join(
            [METHODS[method], str(n)]
            + [_cell(stats[f], fmt) for f, _, fmt in cols]) + " |")
    lines += ["", "## Every run", ""]
    header = ["run"] + [h for _, h, _ in cols] + ["hours"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in records:
        values = [fmt.format(r[f]) if r.get(f) is not None else "-"
                  for f, _, fmt in cols]
        lines.append("| " + " | ".join(
            [r["name"]] + values + [f"{r['seconds'] / 3600:.2f}"]) + " |")
    lines += ["", "## Genotypes", ""]
    for r in records:
        g = r["genotype"]
        lines.append(f"- **{r['name']}** normal "
                     f"`{_ops(g['normal'])}`, reduce `{_ops(g['reduce'])}` "
                     f"(cells/{r['method']}_s{r['seed']}_normal.png)")
    lines.append("")
    return "\n".join(lines)


def _ops(edges):
    return " ".join(f"{op}<{src}" for op, src in edges)


def _describe_data(config):
    d = config.data
    where = {"folder": d.root, "embedded": "the package's CIFAR-10 subset"
             }.get(d.name, f"tfds, data_dir={d.data_dir or 'default'}")
    s, t = config.search.data, config.train.data
    ev = config.train.evaluate
    seed = ev.get("seed", -1)
    same = (f"the same images and PGD starts for every run (evaluation seed "
            f"{seed})" if seed >= 0 else "chosen by each run's seed")
    return (f"{d.name} ({where}); search on {s.num_train or 'all'} training "
            f"images at {s.image_size or 'native'} px, retraining on "
            f"{t.num_train or 'all'} at {t.image_size or 'native'} px, "
            f"evaluation on {ev.num_examples or 'all'} test images, {same}")


def write_results(results_dir, records, config, meta):
    """results.md, results.json, cells/ and tradeoff.png|svg."""
    from e2rnas_tf import plots
    from e2rnas_tf.space import genotypes as genotypes_lib

    os.makedirs(results_dir, exist_ok=True)
    summary = summarize(records, tuple(config.methods))
    cells = os.path.join(results_dir, "cells")
    for r in records:
        genotype = genotypes_lib.Genotype.from_dict(r["genotype"])
        plots.plot_genotype(genotype, cells,
                            prefix=f"{r['method']}_s{r['seed']}")
    robust = f"{config.robust.attack}_{float(config.robust.eps):g}"
    for ext in ("png", "svg"):
        plots.plot_method_tradeoff(
            records, os.path.join(results_dir, f"tradeoff.{ext}"),
            robust_field=robust,
            robust_label=(f"{config.robust.attack.upper()} "
                          f"{float(config.robust.eps):g}/255 accuracy"),
            labels=METHODS)
    files.write_json(os.path.join(results_dir, "results.json"),
                     pipeline.jsonable({"meta": meta, "summary": summary,
                                        "runs": records}), sort_keys=False)
    files.write_text(os.path.join(results_dir, "results.md"),
                     format_results(records, summary, meta))
    return summary


def reproduce(config, workdir, *, overwrite=False, command="", log=print):
    """Runs every (method, seed) and writes ``<workdir>/results``.

    Args:
        config: a `config_lib.reproduce_config()` (configs/reproduce.py).
        workdir: output directory; runs already finished there are reused.
        overwrite: rerun stages whose directories hold a different config.
        command: the command line, recorded in the results.
        log: a print-like callable.

    Returns:
        ``{"records": [...], "summary": {...}, "results_dir": path}``.
    """
    _check(config)
    start = time.perf_counter()
    records = []
    runs = [(m, s) for s in config.seeds for m in config.methods]
    for i, (method, seed) in enumerate(runs):
        log(f"reproduce: run {i + 1}/{len(runs)}: {METHODS[method]}, "
            f"seed {seed}")
        search_cfg, train_cfg = method_configs(config, method, seed)
        result = pipeline.search_train_evaluate(
            search_cfg, train_cfg,
            os.path.join(workdir, "runs", f"{method}_s{seed}"),
            overwrite=overwrite, log=log)
        records.append(run_record(method, seed, result))
    # Tables list runs by method, then seed.
    order = {m: k for k, m in enumerate(config.methods)}
    records.sort(key=lambda r: (order[r["method"]], r["seed"]))
    t = config.train.model
    meta = {
        "variant": config.variant,
        "command": command or "e2rnas reproduce",
        "machine": pipeline.describe_machine(),
        "hours": sum(r["seconds"] for r in records) / 3600,
        "this_invocation_hours": (time.perf_counter() - start) / 3600,
        "runs": len(records),
        "seeds": list(config.seeds),
        "data": _describe_data(config),
        "num_examples": records[0]["num_examples"] if records else 0,
        "image_size": records[0]["image_size"] if records else 0,
        "train_scale": (f"{t.layers} cells, C={t.channels}, trained "
                        f"{config.train.epochs} epochs"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "methods": {m: describe_method(method_configs(config, m, 0)[0])
                    for m in config.methods},
    }
    results_dir = os.path.join(workdir, "results")
    # Another process may be writing them (seeds run side by side).
    with workdir_lib.WorkdirLock(workdir, wait=pipeline.RESULTS_WAIT_SECONDS):
        summary = write_results(results_dir, records, config, meta)
    log(f"reproduce: results in {results_dir}/results.md")
    return {"records": records, "summary": summary,
            "results_dir": results_dir}


def main(config, args):
    """``e2rnas reproduce --config=configs/reproduce.py[:cpu|paper|tiny]
    --workdir=DIR``."""
    if not args.workdir:
        raise ReproduceError("Expected --workdir=DIR for the runs and results")
    command = shlex.join(args.command_line or ("e2rnas", "reproduce"))
    result = reproduce(config, args.workdir, overwrite=args.overwrite,
                       command=command,
                       log=lambda *a: print(*a, flush=True))
    with open(os.path.join(result["results_dir"], "results.md")) as f:
        print(f.read())
    return 0
