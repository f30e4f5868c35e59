"""TensorBoard summaries of a search: alpha heatmaps, cells, hparams, traces.

Where these run: eagerly, on the host, once per epoch (images and text) or
once per run (hparams); nothing here is meant to be traced into a compiled
step except `alpha_entropy`, which is plain TensorFlow.

Tags written by `write_search_epoch_summaries`:

- ``arch/alpha_normal``, ``arch/alpha_reduce``: heatmap images of the
  softmaxed op weights (rows = edges, columns = ops).
- ``arch/cell_normal``, ``arch/cell_reduce``: cell diagram images of the
  derived genotype.
- ``arch/genotype``: the genotype as a markdown table (text).
- ``arch/entropy_normal``, ``arch/entropy_reduce``: mean per-edge entropy
  of the op weights, in nats (``log(num_ops)`` = undecided).
- ``arch/skip_connect_normal``: skip connections in the derived normal cell
  (DARTS' collapse symptom).

Reference:
    Liu, Simonyan, Yang. DARTS. https://arxiv.org/abs/1806.09055
    Yue, Lin, Huang, Zhang. E2RNAS. https://arxiv.org/abs/2011.09820
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "alpha_heatmap_image", "genotype_text", "cell_diagram_image",
    "alpha_entropy", "num_skip_connections", "write_search_epoch_summaries",
    "flatten_config", "write_hparams", "parse_profile_steps", "profile",
]


def _figure_to_image(fig):
    """Renders and closes `fig`: uint8 ``[1, H, W, 3]``."""
    from e2rnas_tf import plots

    plt = plots._pyplot()
    try:
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
    finally:
        plt.close(fig)
    return np.ascontiguousarray(rgba[None, :, :, :3], dtype=np.uint8)


def _edge_names(num_edges):
    names, node = [], 0
    while len(names) < num_edges:
        for j in range(node + 2):
            src = ("$c_{k-2}$", "$c_{k-1}$")[j] if j < 2 else str(j - 2)
            names.append(f"{node} \u2190 {src}")
        node += 1
    return names[:num_edges]


def alpha_heatmap_image(weights, primitives, title=""):
    """A heatmap of op weights as an image for `tf.summary.image`.

    Args:
        weights: ``[num_edges, num_ops]`` op weights (softmaxed alpha).
        primitives: op names, in column order.
        title: image title.

    Returns:
        uint8 array ``[1, H, W, 3]``.

    Example:

    >>> image = alpha_heatmap_image(np.full([14, 8], 1 / 8), PRIMITIVES)
    >>> tf.summary.image("arch/alpha_normal", image, step=0)
    """
    from e2rnas_tf import plots

    weights = np.asarray(weights, dtype=np.float64)
    primitives = list(primitives)
    if weights.ndim != 2 or weights.shape[1] != len(primitives):
        raise ValueError(
            f"Expected weights of shape [num_edges, {len(primitives)}]. "
            f"Received: shape={weights.shape}")
    plt = plots._pyplot()
    num_edges = weights.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(primitives),
                                    1.2 + 0.32 * num_edges), dpi=80)
    vmax = max(float(weights.max()), 1e-6)
    im = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=vmax,
                   aspect="auto")
    ax.set_xticks(range(len(primitives)))
    ax.set_xticklabels(primitives, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(num_edges))
    ax.set_yticklabels(_edge_names(num_edges), fontsize=8)
    best = weights.argmax(axis=1)
    for e in range(num_edges):
        for k in range(len(primitives)):
            # Bold marks each edge's strongest op; dark text on the
            # bright end of viridis, light text elsewhere.
            ax.text(k, e, f"{weights[e, k]:.2f}", ha="center", va="center",
                    fontsize=6.5,
                    color="black" if weights[e, k] > 0.6 * vmax else "white",
                    weight="bold" if k == best[e] else "normal")
    fig.colorbar(im, ax=ax, fraction=0.04)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _figure_to_image(fig)


def cell_diagram_image(genotype, cell="normal"):
    """`plots.cell_figure` rendered to a uint8 ``[1, H, W, 3]`` array."""
    from e2rnas_tf import plots

    fig = plots.cell_figure(genotype, cell)
    fig.set_dpi(80)
    return _figure_to_image(fig)


def genotype_text(genotype):
    """The genotype as markdown (TensorBoard's text plugin renders it).

    Args:
        genotype: a `Genotype`.

    Returns:
        A str with one table per cell (node, input, op) and the concat.
    """
    def state(j):
        if j < 2:
            return ("`c_{k-2}`", "`c_{k-1}`")[j]
        return f"node {j - 2}"

    lines = []
    for cell in ("normal", "reduce"):
        lines += [f"**{cell} cell**", "", "| node | input | op |",
                  "|---|---|---|"]
        for k, (op, j) in enumerate(getattr(genotype, cell)):
            lines.append(f"| {k // 2} | {state(j)} | {op} |")
        concat = ", ".join(state(s) for s in getattr(genotype,
                                                     f"{cell}_concat"))
        lines += ["", f"output = concat({concat})", ""]
    lines += ["```", genotype.to_json(), "```"]
    return "\n".join(lines)


def alpha_entropy(weights):
    """Mean over edges of the entropy of each edge's op weights, in nats.

    Args:
        weights: ``[num_edges, num_ops]`` rows summing to one.

    Returns:
        A float32 scalar tensor: ``log(num_ops)`` for uniform rows, 0 for
        one-hot rows.
    """
    import tensorflow as tf

    w = tf.cast(tf.convert_to_tensor(weights), tf.float32)
    # 0 * log(0) is taken as 0: clamp inside the log only.
    plogp = w * tf.math.log(tf.maximum(w, 1e-30))
    return tf.reduce_mean(-tf.reduce_sum(plogp, axis=-1))


def num_skip_connections(genotype, cell="normal"):
    """How many edges of one cell are ``skip_connect``."""
    if cell not in ("normal", "reduce"):
        raise ValueError(
            f"Expected cell='normal' or 'reduce'. Received: cell={cell!r}")
    return sum(op == "skip_connect" for op, _ in getattr(genotype, cell))


def write_search_epoch_summaries(writer, step, weights_normal,
                                 weights_reduce, genotype, primitives):
    """Images, text and scalars describing the architecture at one epoch.

    Args:
        writer: a `tf.summary` writer.
        step: the global step (or epoch) to record at.
        weights_normal: ``[num_edges, num_ops]`` softmaxed alpha, normal.
        weights_reduce: the same for the reduction cell.
        genotype: the `Genotype` derived from these weights.
        primitives: op names, in column order.

    Returns:
        The list of tags written.
    """
    import tensorflow as tf

    weights = {"normal": np.asarray(weights_normal),
               "reduce": np.asarray(weights_reduce)}
    tags = []
    with writer.as_default(step=int(step)):
        for cell, w in weights.items():
            tag = f"arch/alpha_{cell}"
            tf.summary.image(tag, alpha_heatmap_image(
                w, primitives, f"{cell} cell, step {int(step)}"))
            tags.append(tag)
            tag = f"arch/cell_{cell}"
            tf.summary.image(tag, cell_diagram_image(genotype, cell))
            tags.append(tag)
            tag = f"arch/entropy_{cell}"
            tf.summary.scalar(tag, alpha_entropy(w))
            tags.append(tag)
        tf.summary.scalar("arch/skip_connect_normal",
                          num_skip_connections(genotype, "normal"))
        tags.append("arch/skip_connect_normal")
        tf.summary.text("arch/genotype", genotype_text(genotype))
        tags.append("arch/genotype")
    writer.flush()
    return tags


def flatten_config(config, prefix=""):
    """A nested config as ``{"a.b": scalar}`` for the hparams plugin.

    Lists and other values become strings; bools, ints, floats and strings
    are kept.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "to_dict"):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(list(value) if isinstance(value, tuple)
                             else value)
    return flat


def write_hparams(writer, config):
    """Records the run's config with TensorBoard's hparams plugin.

    Args:
        writer: a `tf.summary` writer.
        config: a (nested) `ml_collections.ConfigDict` or dict.

    Returns:
        The flat ``{name: value}`` dict recorded.
    """
    from tensorboard.plugins.hparams import api as hp

    flat = flatten_config(config)
    with writer.as_default():
        hp.hparams(flat)
    writer.flush()
    return flat


def parse_profile_steps(spec):
    """``"START,END"`` -> ``(start, end)``; ``""`` -> ``None``.

    Raises:
        ValueError: unless ``0 <= start < end`` are integers.
    """
    if spec is None or not str(spec).strip():
        return None
    parts = str(spec).split(",")
    try:
        start, end = (int(p) for p in parts)
    except ValueError:
        start = end = None
    if start is None or len(parts) != 2 or not 0 <= start < end:
        raise ValueError(
            "Expected profile_steps='START,END' with 0 <= START < END. "
            f"Received: profile_steps={spec!r}")
    return start, end


class _StepProfiler:
    """Starts the TF profiler at step `start` and stops it at `end`."""

    def __init__(self, logdir, start, end):
        self.logdir, self.start, self.end = logdir, start, end
        self.active = False
        self.done = False

    def __call__(self, step):
        """Call once per step, before running step `step`."""
        import tensorflow as tf

        step = int(step)
        if not self.active and not self.done and self.start <= step < self.end:
            tf.profiler.experimental.start(self.logdir)
            self.active = True
        elif self.active and step >= self.end:
            self.stop()

    def stop(self):
        """Stops a running trace (safe to call at any time)."""
        import tensorflow as tf

        if self.active:
            tf.profiler.experimental.stop()
            self.active = False
            self.done = True


def profile(logdir, start, end):
    """A per-step hook tracing steps ``start .. end - 1`` with the profiler.

    The trace lands in ``<logdir>/plugins/profile/<run>/`` (TensorBoard's
    Profile tab, from the ``xprof`` package, shows it; mark each step with
    ``tf.profiler.experimental.Trace("step", step_num=n, _r=1)`` for step
    times). Call the hook with the step number before each step, and its
    ``stop()`` when the loop ends, so a run shorter than ``end`` still
    writes its trace.

    Args:
        logdir: the TensorBoard log directory.
        start: first traced step.
        end: first step no longer traced.

    Returns:
        A callable ``hook(step)`` with a ``stop()`` method.

    Example:

    >>> hook = profile(logdir, *parse_profile_steps(config.profile_steps))
    >>> for step in range(num_steps):
    ...     hook(step)
    ...     train_step()
    >>> hook.stop()
    """
    if (isinstance(start, bool) or isinstance(end, bool)
            or not isinstance(start, int) or not isinstance(end, int)
            or not 0 <= start < end):
        raise ValueError(
            "Expected integers 0 <= start < end. "
            f"Received: start={start!r}, end={end!r}")
    return _StepProfiler(logdir, start, end)
