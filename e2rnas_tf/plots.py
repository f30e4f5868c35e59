"""Pictures of a search: cell diagrams, alpha history, metrics, trade-offs.

Everything is drawn with matplotlib alone (Agg backend, no graphviz), so
it works on a headless machine. The output format follows the file
extension (``.png``, ``.svg``, ``.pdf``).

Files read from a search run directory by ``e2rnas plot --workdir=RUN``:

- ``genotype.json``: the derived genotype (cell diagrams).
- ``alpha_history.npz``: arrays ``alpha_normal`` and ``alpha_reduce``
  (or ``normal`` and ``reduce``) of shape ``[epochs, num_edges, num_ops]``
  holding the raw architecture parameters (alpha) after each epoch;
  softmaxed per edge here. The op names come from an optional
  ``primitives`` array, else ``config.json``'s ``model.primitives``, else
  the default op set.
- ``metrics.jsonl``: one JSON object per line; records with a ``step`` key
  are plotted against it (others, such as ``"kind": "epoch"`` lines, are
  skipped). Every numeric key starting with ``objective/`` or ``obj/``
  (objective values, e.g. ``objective/acc``) goes to the top panel and
  every key starting with ``weight/`` or ``mgda/`` (MGDA combination
  weights) to the bottom one.

Reference:
    Liu, Simonyan, Yang. DARTS. https://arxiv.org/abs/1806.09055
    Yue, Lin, Huang, Zhang. E2RNAS. https://arxiv.org/abs/2011.09820
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from e2rnas_tf.space import genotypes as genotypes_lib

__all__ = [
    "cell_figure", "plot_cell", "plot_genotype", "alpha_history_figure",
    "plot_alpha_history", "metrics_figure", "plot_metrics", "plot_tradeoff",
    "read_metrics", "main",
]

# DARTS-paper colours: inputs green, intermediate nodes blue, output yellow.
_INPUT_COLOR = "#a6d96a"
_NODE_COLOR = "#9ecae1"
_OUTPUT_COLOR = "#fee08b"
_OP_COLORS = {
    "skip_connect": "#1b9e77", "max_pool_3x3": "#d95f02",
    "avg_pool_3x3": "#7570b3", "sep_conv_3x3": "#e7298a",
    "sep_conv_5x5": "#1f78b4", "dil_conv_3x3": "#66a61e",
    "dil_conv_5x5": "#e6ab02", "none": "#999999",
}


def _pyplot():
    import matplotlib
    # Rendering to files only; never open a window.
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


# Files that depend only on what is drawn: no creation date, and SVG ids
# from a fixed salt instead of a random one (a resumed or repeated run
# writes the same bytes).
_NO_DATE = {".svg": {"Date": None}, ".pdf": {"CreationDate": None}}


def _save(fig, path, dpi=100):
    """Writes and closes `fig`; SVG text stays text (searchable, editable)."""
    import matplotlib
    plt = _pyplot()
    metadata = _NO_DATE.get(os.path.splitext(str(path))[1].lower())
    try:
        with matplotlib.rc_context({"svg.fonttype": "none",
                                    "svg.hashsalt": "e2rnas"}):
            fig.savefig(path, dpi=dpi, metadata=metadata)
    finally:
        plt.close(fig)
    return path


def _check_cell(cell):
    if cell not in ("normal", "reduce"):
        raise ValueError(
            f"Expected cell='normal' or 'reduce'. Received: cell={cell!r}")


def _layout(edges, concat, steps):
    """Node positions: layered left to right by longest path from inputs.

    Returns a dict state -> (x, y) for states 0..steps+1 and "out".
    """
    rank = {0: 0, 1: 0}
    for i in range(steps):
        inputs = [j for _, j in edges[2 * i:2 * i + 2]]
        rank[i + 2] = 1 + max(rank[j] for j in inputs)
    last = max(rank.values()) + 1
    columns = {}
    for state in range(steps + 2):
        columns.setdefault(rank[state], []).append(state)
    pos = {}
    dx, dy = 3.4, 1.5
    for r, states in columns.items():
        n = len(states)
        for k, state in enumerate(states):
            pos[state] = (r * dx, ((n - 1) / 2 - k) * dy)
    pos["out"] = (last * dx, 0.0)
    del concat
    return pos


def _node_label(state):
    if state == 0:
        return "c_{k-2}", _INPUT_COLOR
    if state == 1:
        return "c_{k-1}", _INPUT_COLOR
    return str(state - 2), _NODE_COLOR


def _control(p0, p1, rad):
    # matplotlib's arc3 control point; with an equal aspect ratio data and
    # display geometry agree, so the curve can be reproduced here.
    d = p1 - p0
    return (p0 + p1) / 2 + rad * np.array([d[1], -d[0]])


def _curve(p0, p1, rad, n=41):
    t = np.linspace(0.0, 1.0, n)[:, None]
    c = _control(p0, p1, rad)
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t ** 2 * p1


def _inside(points, rect, margin=0.0):
    x0, y0, x1, y1 = rect
    return ((points[:, 0] > x0 - margin) & (points[:, 0] < x1 + margin)
            & (points[:, 1] > y0 - margin) & (points[:, 1] < y1 + margin))


def _grow(rect, margin):
    return (rect[0] - margin, rect[1] - margin, rect[2] + margin,
            rect[3] + margin)


def _overlap(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _route(p0, p1, rects, skip, curves):
    """The arc3 bend of one edge: avoid boxes, then other edges, stay short."""
    best = None
    for rad in (0.0, 0.15, -0.15, 0.3, -0.3, 0.45, -0.45, 0.6, -0.6):
        pts = _curve(p0, p1, rad)
        hits = sum(int(_inside(pts, r, 0.08).sum())
                   for k, r in rects.items() if k not in skip)
        # Curves that run on top of each other read as one edge.
        close = sum(int((np.linalg.norm(pts[8:-8, None] - c[None, 8:-8],
                                        axis=-1) < 0.12).any(1).sum())
                    for c in curves)
        # The bulge (distance of the curve's middle from the chord).
        bulge = 0.5 * abs(rad) * float(np.linalg.norm(p1 - p0))
        cost = 100 * hits + 0.5 * close + bulge
        if best is None or cost < best[0]:
            best = (cost, rad, pts)
    return best[1], best[2]


def _label_rect(xy, text, scale):
    from matplotlib.textpath import TextPath

    # The rendered 9 pt text plus its bbox padding, in data units.
    w = (TextPath((0, 0), text, size=9).get_extents().width + 8) / 72 / scale
    h = 18 / 72 / scale
    return (xy[0] - w / 2, xy[1] - h / 2, xy[0] + w / 2, xy[1] + h / 2)


def _place_label(pts, text, scale, rects, labels, curves, own):
    """Where along its curve a label overlaps least with everything else."""
    best = None
    n = len(pts) - 1
    for t in (0.5, 0.42, 0.58, 0.34, 0.66, 0.27, 0.73, 0.2, 0.8):
        xy = pts[round(t * n)]
        rect = _label_rect(xy, text, scale)
        cost = abs(t - 0.5)
        cost += 50 * sum(_overlap(rect, _grow(r, 0.1))
                         for r in rects.values())
        cost += 80 * sum(_overlap(rect, r) for r in labels)
        cost += 0.3 * sum(int(_inside(c, rect).sum())
                          for k, c in enumerate(curves) if k != own)
        if best is None or cost < best[0]:
            best = (cost, xy, rect)
    return best[1], best[2]


def cell_figure(genotype, cell="normal"):
    """A DARTS-style diagram of one cell of `genotype` as a matplotlib figure.

    Inputs ``c_{k-2}``, ``c_{k-1}`` on the left, intermediate nodes in
    layers by their longest path from the inputs, the output ``c_{k}`` on
    the right; every edge is labelled with its op, and the states in the
    concat feed the output (dashed). Edges bend around boxes and labels
    are placed where they overlap least.

    Args:
        genotype: a `Genotype`.
        cell: ``"normal"`` or ``"reduce"``.

    Returns:
        A `matplotlib.figure.Figure` (close it when done).
    """
    from matplotlib import patches

    _check_cell(cell)
    plt = _pyplot()
    edges = getattr(genotype, cell)
    concat = getattr(genotype, f"{cell}_concat")
    steps = genotype.steps
    pos = {k: np.asarray(v, dtype=float)
           for k, v in _layout(edges, concat, steps).items()}
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    scale = 0.95  # inches per data unit
    x_lo, x_hi = min(xs) - 1.0, max(xs) + 1.0
    y_lo, y_hi = min(ys) - 1.3, max(ys) + 1.3
    fig = plt.figure(figsize=((x_hi - x_lo) * scale, (y_hi - y_lo) * scale))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_aspect("equal")
    ax.axis("off")

    boxes, rects = {}, {}
    box_w, box_h = 1.15, 0.6

    def add_box(key, text, color):
        x, y = pos[key]
        box = patches.FancyBboxPatch(
            (x - box_w / 2, y - box_h / 2), box_w, box_h,
            boxstyle="round,pad=0.02,rounding_size=0.12",
            facecolor=color, edgecolor="#333333", linewidth=1.2, zorder=3)
        ax.add_patch(box)
        label = f"${text}$" if "_" in text else text
        ax.text(x, y, label, ha="center", va="center", fontsize=12,
                zorder=4)
        boxes[key] = box
        rects[key] = (x - box_w / 2, y - box_h / 2,
                      x + box_w / 2, y + box_h / 2)

    for state in range(steps + 2):
        add_box(state, *_node_label(state))
    add_box("out", "c_{k}", _OUTPUT_COLOR)

    # Op edges first, then concat edges; labels after all curves are known.
    links = [(j, k // 2 + 2, op) for k, (op, j) in enumerate(edges)]
    links += [(state, "out", None) for state in concat]
    curves, bends = [], []
    for src, dst, _ in links:
        rad, pts = _route(pos[src], pos[dst], rects, (src, dst), curves)
        curves.append(pts)
        bends.append(rad)
    labels = []
    for k, (src, dst, op) in enumerate(links):
        color = "#777777" if op is None else _OP_COLORS.get(op, "#333333")
        ax.add_patch(patches.FancyArrowPatch(
            pos[src], pos[dst], patchA=boxes[src], patchB=boxes[dst],
            connectionstyle=f"arc3,rad={bends[k]}", arrowstyle="-|>",
            mutation_scale=14, color=color, linewidth=1.5,
            linestyle="--" if op is None else "-", zorder=2))
        if op is None:
            continue
        xy, rect = _place_label(curves[k], op, scale, rects, labels, curves,
                                k)
        labels.append(rect)
        ax.text(xy[0], xy[1], op, ha="center", va="center", fontsize=9,
                color=color, zorder=5,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                      "edgecolor": color, "linewidth": 0.8, "alpha": 0.95})
    ax.text(x_lo + 0.1, y_hi - 0.1, f"{cell} cell", fontsize=13,
            ha="left", va="top", weight="bold")
    return fig


def plot_cell(genotype, cell, path):
    """Draws one cell of `genotype` to `path` (format from its extension).

    Args:
        genotype: a `Genotype`.
        cell: ``"normal"`` or ``"reduce"``.
        path: output file, e.g. ``normal.png`` or ``normal.svg``.

    Returns:
        `path`.

    Example:

    >>> plot_cell(genotypes.PUBLISHED["DARTS_V2"], "normal", "/tmp/n.png")
    '/tmp/n.png'
    """
    return _save(cell_figure(genotype, cell), path, dpi=110)


def plot_genotype(genotype, out_dir, prefix="genotype"):
    """Both cells of `genotype` as PNG and SVG files in `out_dir`.

    Returns:
        The list of written paths (``<prefix>_normal.png`` and so on).
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for cell in ("normal", "reduce"):
        for ext in ("png", "svg"):
            path = os.path.join(out_dir, f"{prefix}_{cell}.{ext}")
            paths.append(plot_cell(genotype, cell, path))
    return paths


def _softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def plot_alpha_history(alpha_history, primitives, path, *, softmax=True,
                       title=None):
    """Writes `alpha_history_figure` to `path` and returns `path`."""
    return _save(alpha_history_figure(alpha_history, primitives,
                                      softmax=softmax, title=title), path)


def alpha_history_figure(alpha_history, primitives, *, softmax=True,
                         title=None):
    """Op weights of every edge of one cell over the epochs of a search.

    One small panel per edge (``node <- input``), one line per op.

    Args:
        alpha_history: ``[epochs, num_edges, num_ops]`` architecture
            parameters, one slice per epoch.
        primitives: op names, in column order.
        softmax: apply the per-edge softmax (pass ``False`` if the history
            already holds op weights).
        title: figure title.

    Returns:
        A `matplotlib.figure.Figure`; panel ``k`` plots edge ``k``.
    """
    history = np.asarray(alpha_history, dtype=np.float64)
    primitives = list(primitives)
    if history.ndim != 3 or history.shape[2] != len(primitives):
        raise ValueError(
            "Expected alpha_history of shape [epochs, num_edges, "
            f"{len(primitives)}]. Received: shape={history.shape}")
    weights = _softmax(history) if softmax else history
    epochs, num_edges, _ = weights.shape
    # Edge k belongs to node i and reads state j, in DARTS order.
    names, node = [], 0
    while len(names) < num_edges:
        for j in range(node + 2):
            src = ("c_{k-2}", "c_{k-1}")[j] if j < 2 else str(j - 2)
            names.append(f"node {node} \u2190 ${src}$" if j < 2
                         else f"node {node} \u2190 {src}")
        node += 1
    names = names[:num_edges]
    cols = min(5, num_edges)
    rows = math.ceil(num_edges / cols)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows),
                             sharex=True, sharey=True, squeeze=False)
    x = np.arange(1, epochs + 1)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= num_edges:
            ax.axis("off")
            continue
        for p, name in enumerate(primitives):
            ax.plot(x, weights[:, k, p], color=_OP_COLORS.get(name),
                    label=name, linewidth=1.4, marker="." if epochs < 20
                    else None)
        ax.set_title(names[k], fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for row in axes:
        row[0].set_ylabel("softmax(alpha)" if softmax else "weight")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(primitives),
               fontsize=9, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97 if title else 1))
    return fig


def read_metrics(metrics_jsonl_path):
    """Records of a ``metrics.jsonl`` file (one JSON object per line).

    Blank lines are skipped; a malformed line raises ``ValueError`` naming
    the line.
    """
    records = []
    with open(metrics_jsonl_path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{metrics_jsonl_path}:{n} is not valid JSON: {e}"
                ) from None
    return records


OBJECTIVE_PREFIXES = ("objective/", "obj/")
WEIGHT_PREFIXES = ("weight/", "mgda/")


def _series(records, prefixes):
    """{key: (steps, values)} for numeric keys starting with `prefixes`."""
    series = {}
    has_steps = any("step" in r for r in records)
    for n, record in enumerate(records):
        if has_steps and "step" not in record:
            continue
        step = record.get("step", n)
        for key, value in record.items():
            if (not key.startswith(prefixes) or isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(value)
    return dict(sorted(series.items()))


def plot_metrics(metrics_jsonl_path, path):
    """Writes `metrics_figure` to `path` and returns `path`."""
    return _save(metrics_figure(metrics_jsonl_path), path)


def metrics_figure(metrics_jsonl_path):
    """Objective values and MGDA weights over the steps of a search.

    Reads every numeric key starting with ``objective/`` or ``obj/`` (top
    panel) or ``weight/`` or ``mgda/`` (bottom panel), against the record's
    ``step``; records without ``step`` are skipped when others have one
    (else the line index is the step). Non-finite values are left out.

    Args:
        metrics_jsonl_path: the run's ``metrics.jsonl``.

    Returns:
        A `matplotlib.figure.Figure` with two axes (objectives, weights).
    """
    records = read_metrics(metrics_jsonl_path)
    panels = [(OBJECTIVE_PREFIXES, "objective"),
              (WEIGHT_PREFIXES, "MGDA weight")]
    data = [(_series(records, prefix), label) for prefix, label in panels]
    if not any(series for series, _ in data):
        raise ValueError(
            f"Expected keys starting with one of "
            f"{OBJECTIVE_PREFIXES + WEIGHT_PREFIXES} in "
            f"{metrics_jsonl_path}. Received: none")
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for ax, (series, label) in zip(axes, data):
        for key, (steps, values) in series.items():
            ax.plot(steps, values, label=key, linewidth=1.3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes,
                    ha="center", va="center", color="#777777")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return fig


_TRADEOFF_KEYS = {
    "params": ("params", "params_m", "num_params"),
    "clean": ("clean_accuracy", "clean_acc", "accuracy", "clean"),
    "robust": ("robust_accuracy", "robust_acc", "robust"),
}


def _leaves(value):
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    return [float(value)]


def _tradeoff_record(item):
    """name, params, clean, robust from a record dict or a run directory."""
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if os.path.isdir(path):
            path = os.path.join(path, "evaluation.json")
        with open(path) as f:
            record = json.load(f)
        record.setdefault("name", os.path.basename(
            os.path.dirname(os.path.abspath(path))))
    else:
        record = dict(item)
    values = {}
    for field, keys in _TRADEOFF_KEYS.items():
        value = next((record[k] for k in keys if k in record), None)
        if isinstance(value, dict):
            # evaluation.json's {attack: {eps: accuracy}}: the strongest
            # attack at the largest epsilon counts, i.e. the minimum.
            leaves = _leaves(value)
            value = min(leaves) if leaves else None
        if value is None:
            raise ValueError(
                f"Expected one of {list(keys)} in tradeoff record "
                f"{record.get('name', item)!r}. Received keys: "
                f"{sorted(record)}")
        values[field] = float(value)
    return str(record.get("name", "")), values


def plot_tradeoff(run_dirs_or_records, path):
    """Parameters vs clean accuracy, coloured by robust accuracy.

    Args:
        run_dirs_or_records: run directories (holding ``evaluation.json``),
            ``evaluation.json`` paths, or dicts with ``name``, ``params``
            (or ``params_m``), ``clean_accuracy`` and ``robust_accuracy``
            (a nested dict such as evaluation.json's
            ``{attack: {eps: accuracy}}`` counts its minimum).
        path: output file.

    Returns:
        `path`.
    """
    points = [_tradeoff_record(item) for item in run_dirs_or_records]
    if not points:
        raise ValueError("Expected at least one run or record. Received: 0")
    names = [n for n, _ in points]
    params = np.array([v["params"] for _, v in points])
    clean = np.array([v["clean"] for _, v in points])
    robust = np.array([v["robust"] for _, v in points])
    # Raw parameter counts are shown in millions.
    millions = params / 1e6 if params.max() > 1e3 else params
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    sc = ax.scatter(millions, clean, c=robust, cmap="viridis", s=70,
                    edgecolors="#333333", zorder=3)
    for name, x, y in zip(names, millions, clean):
        if name:
            ax.annotate(name, (x, y), textcoords="offset points",
                        xytext=(6, 5), fontsize=9)
    fig.colorbar(sc, ax=ax, label="robust accuracy")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("clean accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


_METHOD_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                   "#8c564b")


def plot_method_tradeoff(records, path, *, robust_field, robust_label,
                         labels=None):
    """Parameters vs clean and vs robust accuracy, one colour per method.

    Every run is a small point; each method's mean over its runs is a large
    marker with error bars of one sample standard deviation.

    Args:
        records: dicts with ``method``, ``params_m``, ``clean`` and
            ``robust_field``.
        path: output file (the extension picks the format).
        robust_field: the record key of the robust accuracy shown.
        robust_label: its axis label.
        labels: optional ``{method: legend label}``.

    Returns:
        `path`.
    """
    if not records:
        raise ValueError("Expected at least one record. Received: 0")
    labels = labels or {}
    methods = list(dict.fromkeys(r["method"] for r in records))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, field, ylabel in ((axes[0], "clean", "clean accuracy"),
                              (axes[1], robust_field, robust_label)):
        for k, method in enumerate(methods):
            rows = [r for r in records if r["method"] == method]
            x = np.array([r["params_m"] for r in rows], dtype=float)
            y = np.array([r[field] for r in rows], dtype=float)
            colour = _METHOD_COLOURS[k % len(_METHOD_COLOURS)]
            ax.scatter(x, y, s=25, color=colour, alpha=0.6, zorder=3)
            sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            ax.errorbar(x.mean(), y.mean(), xerr=sd(x), yerr=sd(y),
                        fmt="o", ms=9, color=colour, capsize=4, zorder=4,
                        label=labels.get(method, method))
        ax.set_xlabel("parameters of the retrained network (M)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_pareto(points, path, *, robust_label="robust accuracy"):
    """The Pareto front of parameters vs clean vs robust accuracy.

    Three panels (params-clean, params-robust, clean-robust); the
    non-dominated points (smaller, more accurate, more robust: see
    `sweep.pareto_mask`) are filled and named, the dominated ones hollow.

    Args:
        points: dicts with ``name``, ``params_m``, ``clean``, ``robust``
            and ``pareto`` (bool).
        path: output file.
        robust_label: the robust accuracy's axis label.

    Returns:
        `path`.
    """
    if not points:
        raise ValueError("Expected at least one point. Received: 0")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    pairs = (("params_m", "clean"), ("params_m", "robust"),
             ("clean", "robust"))
    names = {"params_m": "parameters (M)", "clean": "clean accuracy",
             "robust": robust_label}
    for ax, (fx, fy) in zip(axes, pairs):
        for p in points:
            front = bool(p["pareto"])
            ax.scatter(p[fx], p[fy], s=60, zorder=3,
                       facecolors="#d62728" if front else "none",
                       edgecolors="#d62728" if front else "#555555")
            ax.annotate(p["name"], (p[fx], p[fy]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.set_xlabel(names[fx])
        ax.set_ylabel(names[fy])
        ax.grid(alpha=0.3)
    axes[0].set_title("filled: non-dominated (Pareto-optimal)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def main(config, args):
    """``e2rnas plot``: cell diagrams and, for a search run, its history.

    ``--genotype=NAME_OR_JSON --output=DIR`` draws both cells (PNG + SVG).
    ``--workdir=RUN`` draws the run's genotype, alpha history and metrics
    into ``--output`` (default ``RUN/plots``), skipping files that are
    missing.
    """
    del config
    if not args.genotype and not args.workdir:
        raise ValueError(
            "Expected --genotype=NAME_OR_JSON or --workdir=SEARCH_RUN. "
            "Received: neither")
    written = []
    if args.genotype:
        genotype = genotypes_lib.get(args.genotype)
        out = args.output or "."
        prefix = os.path.splitext(os.path.basename(args.genotype))[0]
        written += plot_genotype(genotype, out, prefix)
    if args.workdir:
        run = args.workdir
        if not os.path.isdir(run):
            raise ValueError(f"Run directory {run} does not exist")
        written += plot_run(run, args.output or os.path.join(run, "plots"),
                            genotype=not args.genotype)
    for path in written:
        print(path)
    return 0


def plot_run(run, out, genotype=True):
    """Draws a search run's genotype, alpha history and metrics into ``out``,
    and the params / clean / robust trade-off of the evaluated runs found in
    its subdirectories (``e2rnas plot --workdir=runs``).

    Args:
        run: a search work directory, or a directory of runs.
        out: output directory (created).
        genotype: whether to draw the run's genotype.json cells too.

    Returns:
        The paths written.
    """
    written = []
    os.makedirs(out, exist_ok=True)
    found = False
    genotype_path = os.path.join(run, "genotype.json")
    if os.path.exists(genotype_path) and genotype:
        written += plot_genotype(genotypes_lib.Genotype.load(
            genotype_path), out, "genotype")
        found = True
    history_path = os.path.join(run, "alpha_history.npz")
    if os.path.exists(history_path):
        with np.load(history_path) as history:
            primitives = ([str(p) for p in history["primitives"]]
                          if "primitives" in history.files
                          else _run_primitives(run))
            for cell in ("normal", "reduce"):
                key = next((k for k in (f"alpha_{cell}", cell)
                            if k in history.files), None)
                if key is None:
                    continue
                cell_primitives = primitives or _primitives_of(
                    history[key].shape[-1])
                written.append(plot_alpha_history(
                    history[key], cell_primitives,
                    os.path.join(out, f"alpha_{cell}.png"),
                    title=f"{cell} cell"))
        found = True
    metrics_path = os.path.join(run, "metrics.jsonl")
    if os.path.exists(metrics_path):
        written.append(plot_metrics(
            metrics_path, os.path.join(out, "metrics.png")))
        found = True
    evaluated = sorted(
        os.path.join(run, d) for d in os.listdir(run)
        if os.path.exists(os.path.join(run, d, "evaluation.json")))
    if evaluated:
        # A directory of runs: their trade-off.
        written.append(plot_tradeoff(evaluated,
                                     os.path.join(out, "tradeoff.png")))
        found = True
    if not found:
        raise ValueError(
            f"{run} has none of genotype.json, alpha_history.npz, "
            "metrics.jsonl, nor runs with an evaluation.json")
    return written


def _run_primitives(run):
    """``model.primitives`` of a run's config.json, if it has one."""
    path = os.path.join(run, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError:
            return None
    primitives = (config.get("model") or {}).get("primitives")
    return [str(p) for p in primitives] if primitives else None


def _primitives_of(num_ops):
    from e2rnas_tf.space.ops import PRIMITIVES
    if num_ops != len(PRIMITIVES):
        raise ValueError(
            f"alpha_history.npz has {num_ops} ops but no 'primitives' array; "
            f"expected {len(PRIMITIVES)} (the default op set)")
    return list(PRIMITIVES)
