"""The E2RNAS objectives as pure functions of tensors.

E2RNAS searches the architecture ``alpha`` against several objectives at
once (combined by MGDA elsewhere): the clean validation cross-entropy
(``acc``), the cross-entropy on adversarial examples (``adv``) and the
softmax-expected resource cost of the network (``params``, ``flops``),
optionally held to a target by `constrain`. Nothing here owns a model:
losses take logits, attacks take a ``model_fn``, costs take op weights and a
`ResourceTable`.

Where these run: inside the compiled search step (one replica's batch);
they use only stateless random ops and no Python control flow on tensors,
so they trace under ``tf.function(autograph=False)`` and ``jit_compile``.

Reference:
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
    Wong, Rice, Kolter. Fast is better than free: revisiting adversarial
    training. https://arxiv.org/abs/2001.03994
    Madry et al. Towards Deep Learning Models Resistant to Adversarial
    Attacks. https://arxiv.org/abs/1706.06083
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from e2rnas_tf import costs
from e2rnas_tf import ops as ops_lib
from e2rnas_tf import search_space

__all__ = [
    "CONSTRAINTS", "ResourceTable", "accuracy", "attack", "constrain",
    "cross_entropy", "expected_cost", "fgsm", "genotype_weights", "pgd",
    "resource_table",
]

CONSTRAINTS = ("none", "abs", "max", "floor")
RESOURCE_KINDS = ("params", "flops")
ATTACKS = ("fgsm", "pgd")


# ---------------------------------------------------------------------------
# Losses.


def cross_entropy(logits, labels):
    """Mean sparse softmax cross-entropy, computed in float32.

    Args:
        logits: ``[N, num_classes]`` logits of any float dtype.
        labels: ``[N]`` integer class indices.

    Returns:
        A float32 scalar.

    Example:

    >>> float(cross_entropy(tf.zeros([2, 4]), tf.constant([0, 3])))  # log 4
    1.386...
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))


def accuracy(logits, labels):
    """Share of examples whose arg-max logit is the label, float32.

    Args:
        logits: ``[N, num_classes]`` logits.
        labels: ``[N]`` integer class indices.

    Returns:
        A float32 scalar in [0, 1].
    """
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    hits = tf.equal(predicted, tf.cast(labels, tf.int32))
    return tf.reduce_mean(tf.cast(hits, tf.float32))


# ---------------------------------------------------------------------------
# Attacks.


def _loss_gradient(model_fn, images, labels):
    """Gradient of the summed cross-entropy w.r.t. the input, float32.

    The sum (not the mean) keeps per-example gradients independent of the
    batch size; only their sign is used.
    """
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = tf.cast(model_fn(images), tf.float32)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=logits))
    return tape.gradient(loss, images)


def _project(images, delta, eps):
    """Clips ``delta`` to the L-inf ball and ``images + delta`` to [0, 1]."""
    delta = tf.clip_by_value(delta, -eps, eps)
    return tf.clip_by_value(images + delta, 0.0, 1.0) - images


def _start(images, eps, random_start, seed):
    if not random_start:
        return tf.zeros_like(images)
    seed = tf.cast(seed, tf.int64)
    # Philox named explicitly rather than left to the device to pick. The
    # start is a deterministic function of the seed in any one execution
    # mode, but XLA draws other numbers than the TF kernels for the same
    # seed: a jit-compiled step and an uncompiled one start elsewhere.
    unit = tf.random.stateless_uniform(
        tf.shape(images), seed=seed, minval=-1.0, maxval=1.0,
        dtype=tf.float32, alg="philox")
    return _project(images, unit * eps, eps)


def _check_budget(name, value):
    # Tensors (e.g. an eps schedule held in a variable) are not checked.
    if isinstance(value, (int, float, np.integer, np.floating)) and value < 0:
        raise ValueError(f"Expected `{name}` >= 0. Received: {name}={value!r}")


def fgsm(model_fn, images, labels, *, eps, step_size, random_start=True,
         seed):
    """Fast gradient sign method with a random start, L-inf, pixels in [0, 1].

    As in E2RNAS (after Wong et al.): start from ``x + delta`` with ``delta``
    uniform in ``[-eps, eps]`` (clipped so the image stays in [0, 1]), take
    one step of ``step_size`` along the sign of the input gradient of the
    cross-entropy, project back to the eps-ball around ``x`` and to [0, 1].

    The result is wrapped in `tf.stop_gradient`: gradients of a loss on it
    w.r.t. the weights or the architecture treat the adversarial images as
    data, so no gradient flows through the attack. Call it outside the
    tape of the outer update when possible: inside, the tape also records
    the attack's own gradient computation for nothing.

    Args:
        model_fn: maps float32 images ``[N, H, W, C]`` in [0, 1] to logits.
            Side effects (batch-norm moving statistics in training mode)
            happen once per gradient evaluation.
        images: ``[N, H, W, C]`` clean images in [0, 1].
        labels: ``[N]`` integer labels.
        eps: L-inf radius in pixel units (e.g. ``2 / 255``); a float or a
            float32 scalar tensor.
        step_size: signed-gradient step, pixel units (E2RNAS: 1.25 * eps).
        random_start: start at a uniformly random point of the ball.
        seed: ``[2]`` int32/int64 tensor for the stateless random start; the
            attack is a deterministic function of it (within one execution
            mode: under ``jit_compile`` XLA draws different numbers).

    Returns:
        float32 adversarial images, same shape as ``images``, gradient-free.

    Reference:
        https://arxiv.org/abs/2001.03994, https://arxiv.org/abs/2011.09820
    """
    _check_budget("eps", eps)
    _check_budget("step_size", step_size)
    images = tf.cast(images, tf.float32)
    eps = tf.cast(eps, tf.float32)
    step_size = tf.cast(step_size, tf.float32)
    delta = _start(images, eps, random_start, seed)
    grad = _loss_gradient(model_fn, images + delta, labels)
    delta = _project(images, delta + step_size * tf.sign(grad), eps)
    return tf.stop_gradient(images + delta)


def pgd(model_fn, images, labels, *, eps, step_size, steps, random_start=True,
        seed):
    """Projected gradient descent (PGD-k), L-inf, pixels in [0, 1].

    ``steps`` signed-gradient steps of ``step_size`` from a (random) start,
    each followed by projection to the eps-ball around ``x`` and to [0, 1].
    The steps run in a `tf.while_loop`, so the graph holds one copy of the
    model whatever ``steps`` is. Gradient-free output, as for `fgsm`.

    Args:
        model_fn: maps float32 images in [0, 1] to logits.
        images: ``[N, H, W, C]`` clean images in [0, 1].
        labels: ``[N]`` integer labels.
        eps: L-inf radius, pixel units; a float or float32 scalar tensor.
        step_size: step per iteration, pixel units.
        steps: number of iterations, a Python int >= 1.
        random_start: start at a uniformly random point of the ball.
        seed: ``[2]`` int32/int64 tensor for the stateless random start.

    Returns:
        float32 adversarial images, gradient-free.

    Reference:
        Madry et al. https://arxiv.org/abs/1706.06083
    """
    _check_budget("eps", eps)
    _check_budget("step_size", step_size)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
            or steps < 1:
        raise ValueError(
            f"Expected `steps` to be an integer >= 1. Received: steps={steps!r}")
    images = tf.cast(images, tf.float32)
    eps = tf.cast(eps, tf.float32)
    step_size = tf.cast(step_size, tf.float32)

    def body(i, delta):
        grad = _loss_gradient(model_fn, images + delta, labels)
        return i + 1, _project(images, delta + step_size * tf.sign(grad), eps)

    delta = _start(images, eps, random_start, seed)
    _, delta = tf.while_loop(
        lambda i, _: i < steps, body, (tf.constant(0), delta),
        maximum_iterations=steps)
    return tf.stop_gradient(images + delta)


def attack(model_fn, images, labels, attack_cfg, seed):
    """Runs the attack an `config_lib.attack_config` describes.

    Args:
        model_fn: maps float32 images in [0, 1] to logits.
        images: ``[N, H, W, C]`` clean images in [0, 1].
        labels: ``[N]`` integer labels.
        attack_cfg: has ``name`` (``fgsm`` | ``pgd``), ``eps`` and
            ``step_size`` in 1/255 units (``step_size`` 0 means
            ``1.25 * eps`` for FGSM, ``eps / 4`` for PGD), ``steps`` (PGD)
            and ``random_start``.
        seed: ``[2]`` integer tensor for the random start.

    Returns:
        float32 adversarial images, gradient-free.

    Example:

    >>> cfg = config_lib.attack_config(name="pgd", eps=8.0, steps=7)
    >>> x_adv = attack(lambda x: model(x, training=False), x, y, cfg,
    ...                tf.constant([0, step]))
    """
    name = attack_cfg.name
    if name not in ATTACKS:
        raise ValueError(
            f"Expected an attack name in {list(ATTACKS)}. "
            f"Received: attack.name={name!r}")
    eps = float(attack_cfg.eps) / 255.0
    step_size = float(attack_cfg.step_size) / 255.0
    if name == "fgsm":
        step_size = step_size or 1.25 * eps
        return fgsm(model_fn, images, labels, eps=eps, step_size=step_size,
                    random_start=bool(attack_cfg.random_start), seed=seed)
    step_size = step_size or eps / 4.0
    return pgd(model_fn, images, labels, eps=eps, step_size=step_size,
               steps=int(attack_cfg.steps),
               random_start=bool(attack_cfg.random_start), seed=seed)


# ---------------------------------------------------------------------------
# Resource constraints.


def constrain(cost, target, mode):
    """Turns a resource cost into a penalty relative to a target.

    Args:
        cost: scalar cost tensor (e.g. expected parameters, millions).
        target: the target ``T``, same units.
        mode: one of `CONSTRAINTS`:
            ``none``: ``cost`` (minimise the resource);
            ``abs``: ``|cost - T|`` (aim at the target from either side);
            ``max``: ``max(cost - T, 0)`` (a budget: no pressure below it);
            ``floor``: ``max(cost, T)`` (minimise, but not below ``T``: the
            gradient is zero once the cost is under the target).

    Returns:
        A float32 scalar.
    """
    if mode not in CONSTRAINTS:
        raise ValueError(
            f"Expected a constraint mode in {list(CONSTRAINTS)}. "
            f"Received: mode={mode!r}")
    cost = tf.cast(cost, tf.float32)
    if mode == "none":
        return cost
    target = tf.cast(target, tf.float32)
    if mode == "abs":
        return tf.abs(cost - target)
    if mode == "max":
        return tf.nn.relu(cost - target)
    return tf.maximum(cost, target)


# ---------------------------------------------------------------------------
# Expected resource cost.


@dataclasses.dataclass(frozen=True, eq=False)
class ResourceTable:
    """Per-edge, per-op cost of a derived network, in millions.

    ``normal[e, k]`` is the cost of op ``k`` on edge ``e`` summed over all
    normal cells (each at its own channels and resolution); ``reduce``
    likewise over the reduction cells; ``const`` is everything not on an
    edge (stem, cell preprocessing, classifier). The cost of a derived
    network is then ``const`` plus the entries of its chosen (edge, op)
    pairs, and `expected_cost` weights every entry by the op's softmax
    weight.

    Attributes:
        kind: ``params`` or ``flops`` (multiply-adds).
        normal: float32 ``[num_edges, num_ops]`` array, read-only.
        reduce: float32 ``[num_edges, num_ops]`` array, read-only.
        const: float, the cost not on any edge.
    """

    kind: str
    normal: np.ndarray
    reduce: np.ndarray
    const: float

    def __post_init__(self):
        if self.kind not in RESOURCE_KINDS:
            raise ValueError(
                f"Expected `kind` in {list(RESOURCE_KINDS)}. "
                f"Received: kind={self.kind!r}")
        for field in ("normal", "reduce"):
            table = np.array(getattr(self, field), dtype=np.float32)
            if table.ndim != 2:
                raise ValueError(
                    f"Expected a 2-D `{field}` table [num_edges, num_ops]. "
                    f"Received: shape={table.shape}")
            table.setflags(write=False)
            object.__setattr__(self, field, table)
        if self.normal.shape != self.reduce.shape:
            raise ValueError(
                "Expected `normal` and `reduce` tables of one shape. Received: "
                f"{self.normal.shape} and {self.reduce.shape}")
        object.__setattr__(self, "const", float(self.const))


def _cell_plan(channels, layers, image_size, steps, multiplier,
               stem_multiplier):
    """The derived network's cells: channels, resolution and inputs.

    Follows DARTS' ``NetworkCIFAR``: a ``stem_multiplier * C`` stem, and
    reductions at ``layers // 3`` and ``2 * layers // 3`` that double the
    channels and halve the resolution (``ceil``).
    """
    c_curr = stem_multiplier * channels
    size = image_size
    c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
    size_prev_prev, size_prev = size, size
    reduction_prev = False
    plan = []
    reductions = search_space.reduction_layers(layers)
    for i in range(layers):
        reduction = i in reductions
        if reduction:
            c_curr *= 2
        plan.append(dict(channels=c_curr, reduction=reduction,
                         reduction_prev=reduction_prev, c_prev_prev=c_prev_prev,
                         c_prev=c_prev, size_prev_prev=size_prev_prev,
                         size=size_prev))
        out_size = (size_prev + 1) // 2 if reduction else size_prev
        reduction_prev = reduction
        c_prev_prev, c_prev = c_prev, multiplier * c_curr
        size_prev_prev, size_prev = size_prev, out_size
    return plan, c_prev


def _validate_scale(channels, layers, num_classes, image_size, steps,
                    multiplier, stem_multiplier):
    for name, value in (("channels", channels), ("layers", layers),
                        ("num_classes", num_classes),
                        ("image_size", image_size), ("steps", steps),
                        ("multiplier", multiplier),
                        ("stem_multiplier", stem_multiplier)):
        ops_lib._check_positive_int(name, value)
    if layers < 3:
        raise ValueError(f"Expected `layers` >= 3. Received: layers={layers}")
    if multiplier > steps:
        raise ValueError(
            "Expected `multiplier` <= `steps`. "
            f"Received: multiplier={multiplier}, steps={steps}")


def resource_table(kind, *, channels, layers, num_classes, image_size,
                   steps=4, multiplier=4, stem_multiplier=3,
                   primitives=ops_lib.PRIMITIVES):
    """Measures the per-edge cost table of a derived network.

    The table refers to the network that would be retrained from a genotype
    (DARTS' ``NetworkCIFAR`` at ``channels``, ``layers`` and
    ``image_size``): ops with affine batch norm, pooling without the extra
    batch norm the supernet adds, ``skip_connect`` at stride 2 a
    FactorizedReduce, ``none`` free; no auxiliary head. Each op is built
    with `ops.make_op` and measured (`costs.count_params`, or
    `costs.count_macs` for ``flops``) once per distinct (op, channels,
    stride, resolution).

    Args:
        kind: ``params`` (learned parameters) or ``flops`` (multiply-adds
            for one image).
        channels: initial channels ``C`` of the derived network.
        layers: cells of the derived network.
        num_classes: classifier outputs.
        image_size: input height (= width).
        steps: intermediate nodes per cell.
        multiplier: nodes concatenated into a cell's output.
        stem_multiplier: stem width as a multiple of ``channels``.
        primitives: op names in the order of alpha's columns.

    Returns:
        A `ResourceTable` in millions.

    Example:

    >>> table = resource_table("params", channels=36, layers=20,
    ...                        num_classes=10, image_size=32)
    >>> w = genotype_weights(genotypes.PUBLISHED["DARTS_V2"])
    >>> round(float(expected_cost(*w, table)), 2)  # DARTS (2nd order)
    3.35
    """
    if kind not in RESOURCE_KINDS:
        raise ValueError(
            f"Expected `kind` in {list(RESOURCE_KINDS)}. Received: kind={kind!r}")
    _validate_scale(channels, layers, num_classes, image_size, steps,
                    multiplier, stem_multiplier)
    primitives = ops_lib.check_primitives(primitives)
    cache = {}

    def measure(key, make, input_shape):
        # One build (and, for flops, one trace) per distinct configuration.
        if key not in cache:
            layer = make()
            layer.build((1,) + tuple(input_shape))
            if kind == "params":
                cache[key] = costs.count_params(layer)
            else:
                cache[key] = costs.count_macs(layer, input_shape)
        return cache[key]

    def op_cost(name, c, stride, size):
        if name == "none":
            return 0
        return measure(
            ("op", name, c, stride, size),
            lambda: ops_lib.make_op(name, c, stride, affine=True),
            (size, size, c))

    plan, c_last = _cell_plan(channels, layers, image_size, steps, multiplier,
                              stem_multiplier)
    edges = search_space.edge_inputs(steps)
    tables = {False: np.zeros((len(edges), len(primitives)), np.float64),
              True: np.zeros((len(edges), len(primitives)), np.float64)}
    stem_c = stem_multiplier * channels
    const = measure(
        ("stem",), lambda: keras.Sequential([
            keras.layers.Conv2D(stem_c, 3, padding="same", use_bias=False),
            ops_lib.BatchNorm(affine=True)]),
        (image_size, image_size, 3))
    for cell in plan:
        c, size = cell["channels"], cell["size"]
        if cell["reduction_prev"]:
            const += measure(
                ("fr", cell["c_prev_prev"], c, cell["size_prev_prev"]),
                lambda: ops_lib.FactorizedReduce(c, affine=True),
                (cell["size_prev_prev"],) * 2 + (cell["c_prev_prev"],))
        else:
            const += measure(
                ("rcb", cell["c_prev_prev"], c, cell["size_prev_prev"]),
                lambda: ops_lib.ReLUConvBN(c, 1, 1, affine=True),
                (cell["size_prev_prev"],) * 2 + (cell["c_prev_prev"],))
        const += measure(
            ("rcb", cell["c_prev"], c, size),
            lambda: ops_lib.ReLUConvBN(c, 1, 1, affine=True),
            (size, size, cell["c_prev"]))
        reduced = (size + 1) // 2
        table = tables[cell["reduction"]]
        for e, (_, j) in enumerate(edges):
            # In a reduction cell only the edges from the two inputs have
            # stride 2; edges between nodes run at the reduced resolution.
            stride = 2 if cell["reduction"] and j < 2 else 1
            edge_size = reduced if cell["reduction"] and j >= 2 else size
            for k, name in enumerate(primitives):
                table[e, k] += op_cost(name, c, stride, edge_size)
    const += measure(("classifier", c_last, num_classes),
                     lambda: keras.layers.Dense(num_classes), (c_last,))
    return ResourceTable(kind, tables[False] / 1e6, tables[True] / 1e6,
                         const / 1e6)


def expected_cost(weights_normal, weights_reduce, table):
    """Softmax-expected cost of the network, in millions, float32.

    ``const + sum(w_normal * table.normal) + sum(w_reduce * table.reduce)``:
    linear in the op weights, so its gradient w.r.t. alpha (through the
    softmax) pushes weight from expensive to cheap ops on every edge.

    This counts all ``num_edges`` candidate edges (14 for 4 nodes) of every
    cell, whereas a derived cell keeps two per node (8), so it is an
    upper-level surrogate of the size, not the derived network's exact
    size; with the 0/1 weights of `genotype_weights` it is exact.

    Args:
        weights_normal: ``[num_edges, num_ops]`` op weights (softmax of
            alpha_normal).
        weights_reduce: the same for the reduction cell.
        table: a `ResourceTable`.

    Returns:
        A float32 scalar.

    Reference:
        https://arxiv.org/abs/2011.09820 (the resource objective).
    """
    weights_normal = tf.cast(weights_normal, tf.float32)
    weights_reduce = tf.cast(weights_reduce, tf.float32)
    if weights_normal.shape != table.normal.shape \
            or weights_reduce.shape != table.reduce.shape:
        raise ValueError(
            f"Expected op weights of shape {table.normal.shape}. Received: "
            f"{weights_normal.shape} and {weights_reduce.shape}")
    return (tf.constant(table.const, tf.float32)
            + tf.reduce_sum(weights_normal * tf.constant(table.normal))
            + tf.reduce_sum(weights_reduce * tf.constant(table.reduce)))


def genotype_weights(genotype, primitives=ops_lib.PRIMITIVES):
    """0/1 op weights selecting a genotype's edges, for `expected_cost`.

    Edge ``(node i, input j)`` with op ``k`` in the genotype gets weight 1
    at ``[row(i, j), k]``; every other entry is 0 (the dropped edges cost
    nothing). With these weights `expected_cost` is the exact cost of the
    derived network (when the genotype concatenates ``multiplier`` nodes).

    Args:
        genotype: a `genotypes.Genotype`.
        primitives: op names in the table's column order.

    Returns:
        ``(w_normal, w_reduce)`` float32 NumPy arrays
        ``[num_edges(steps), len(primitives)]``.
    """
    primitives = tuple(primitives)
    steps = genotype.steps
    rows = {edge: e for e, edge in enumerate(search_space.edge_inputs(steps))}
    weights = []
    for gene in (genotype.normal, genotype.reduce):
        w = np.zeros((len(rows), len(primitives)), np.float32)
        for k, (op, j) in enumerate(gene):
            if op not in primitives:
                raise ValueError(
                    f"Expected genotype ops among {list(primitives)}. "
                    f"Received: op={op!r}")
            w[rows[(k // 2, j)], primitives.index(op)] += 1.0
        weights.append(w)
    return tuple(weights)
