"""Resource objectives: what the searched network costs, as a function of alpha.

E2RNAS's efficiency objectives (``params``, ``flops``) are differentiable
functions of the architecture ``alpha``. Each is built from three choices
(``config.resource``):

- a **cost model**, a `ResourceTable` of per-(edge, op) costs:
  ``measured`` (ours: every op of the derived network built and counted at
  the evaluation scale, in millions; `measured_table`), ``authors`` (the
  closed forms of the authors' published run, supernet-scale, params / 1e5
  and FLOPs / 1e8; `authors_table`) or ``authors_v1`` (the first version's
  parameter formula, raw counts; `authors_v1_table`);
- an **estimate**, how alpha weights those costs (`resource_cost`):
  ``expected`` (softmax-weighted over all 14 edges, as the paper),
  ``derived`` (the value is the cost of the genotype the DARTS rule derives
  from the current alpha, its gradient that of the expected cost: a
  straight-through estimate, ours) or ``gumbel`` (a hard Gumbel-softmax
  sample of one op per edge with a straight-through gradient, the authors'
  ``temperature=Gumbel`` option);
- a **constraint** against a target (`constrain`).

Everything here is a pure function of tensors (or NumPy for the tables) and
traces under ``tf.function(autograph=False)`` and ``jit_compile``.

Reference:
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820 (resource
    objective); their code: github.com/yuezhixiong/NAS-Benchmark,
    DARTS/architect.py (`param_number`, `cal_flops`) at commit 9b66e4d and
    DARTS_LBJ/architect.py at commit 98da776.
    Jang, Gu, Poole. Categorical Reparameterization with Gumbel-Softmax.
    https://arxiv.org/abs/1611.01144
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from e2rnas_tf.space import costs, topology
from e2rnas_tf.space import ops as ops_lib

__all__ = [
    "CONSTRAINTS", "COST_MODELS", "ESTIMATES", "KINDS", "ResourceTable",
    "authors_table", "authors_v1_table", "constrain", "derived_weights",
    "expected_cost", "genotype_weights", "gumbel_hard", "make_table",
    "measured_table", "resource_cost",
]

KINDS = ("params", "flops")
COST_MODELS = ("measured", "authors", "authors_v1")
ESTIMATES = ("expected", "derived", "gumbel")
# ours: none | abs | max | floor; the authors' formulas where they differ
# (their `min` is our `floor`; their `max` keeps a floor of 1; `both`
# needs a second target; the first version's `min` is a lower bound).
CONSTRAINTS = ("none", "abs", "max", "floor", "authors_max", "authors_both",
               "authors_v1_min")
# What one unit of a cost model's value is, for messages.
UNIT_NAMES = {1e6: "M", 1e5: "x1e5", 1e8: "x1e8", 1.0: ""}


# ---------------------------------------------------------------------------
# Constraints.


def constrain(cost, target, mode, target_max=0.0):
    """Turns a resource cost into a penalty relative to a target.

    Args:
        cost: scalar cost tensor, in the units of its `ResourceTable`.
        target: the target ``T``, same units.
        mode: one of `CONSTRAINTS`:
            ``none``: ``cost`` (minimise the resource);
            ``abs``: ``|cost - T|`` (aim at the target from either side;
            the authors' published run);
            ``max``: ``max(cost - T, 0)`` (a budget: no pressure below it);
            ``floor``: ``max(cost, T)`` (minimise, but not below ``T``: the
            gradient is zero once the cost is under the target; the
            authors' ``min``);
            ``authors_max``: ``max(cost - T, 1)`` (the authors' ``max``,
            both versions: no pressure below ``T + 1``);
            ``authors_both``: ``cost + max(max(cost - T_max, 1), T - cost)``
            (the authors' ``both``, published code);
            ``authors_v1_min``: ``max(T - cost, 1)`` (the first version's
            ``min``: a lower bound, pushing the cost up while it is below
            ``T - 1`` and not at all above).
        target_max: ``T_max`` of ``authors_both``.

    Returns:
        A float32 scalar.

    Reference:
        DARTS/architect.py (``param_number``) at 9b66e4d, lines 111-122;
        DARTS_LBJ/architect.py at 98da776, lines 84-90.
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
    if mode == "floor":
        return tf.maximum(cost, target)
    if mode == "authors_max":
        return tf.maximum(cost - target, 1.0)
    if mode == "authors_both":
        t_max = tf.cast(target_max, tf.float32)
        return cost + tf.maximum(tf.maximum(cost - t_max, 1.0), target - cost)
    return tf.maximum(target - cost, 1.0)


# ---------------------------------------------------------------------------
# Cost tables.


@dataclasses.dataclass(frozen=True, eq=False)
class ResourceTable:
    """Per-edge, per-op cost of a network, in units of ``unit``.

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
        unit: what one unit of the values counts (``1e6``: millions, the
            measured model; ``1e5`` / ``1e8``: the authors' parameter /
            FLOP units; ``1``: raw counts).
        model: the cost model that made it, one of `COST_MODELS`.
    """

    kind: str
    normal: np.ndarray
    reduce: np.ndarray
    const: float
    unit: float = 1e6
    model: str = "measured"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"Expected `kind` in {list(KINDS)}. "
                f"Received: kind={self.kind!r}")
        if self.model not in COST_MODELS:
            raise ValueError(
                f"Expected `model` in {list(COST_MODELS)}. "
                f"Received: model={self.model!r}")
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
        object.__setattr__(self, "unit", float(self.unit))

    @property
    def unit_name(self):
        """``"M"``, ``"x1e5"``, ``"x1e8"`` or ``""`` (raw counts)."""
        return UNIT_NAMES.get(self.unit, f"x{self.unit:g}")


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


def measured_table(kind, *, channels, layers, num_classes, image_size,
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

    >>> table = measured_table("params", channels=36, layers=20,
    ...                        num_classes=10, image_size=32)
    >>> w = genotype_weights(genotypes.PUBLISHED["DARTS_V2"])
    >>> round(float(expected_cost(*w, table)), 2)  # DARTS (2nd order)
    3.35
    """
    if kind not in KINDS:
        raise ValueError(
            f"Expected `kind` in {list(KINDS)}. Received: kind={kind!r}")
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

    plan, c_last = topology.cell_plan(
        channels, layers, multiplier=multiplier,
        stem_multiplier=stem_multiplier, image_size=image_size)
    edges = topology.edge_inputs(steps)
    tables = {False: np.zeros((len(edges), len(primitives)), np.float64),
              True: np.zeros((len(edges), len(primitives)), np.float64)}
    stem_c = stem_multiplier * channels
    const = measure(
        ("stem",), lambda: keras.Sequential([
            keras.layers.Conv2D(stem_c, 3, padding="same", use_bias=False),
            ops_lib.BatchNorm(affine=True)]),
        (image_size, image_size, 3))
    for cell in plan:
        c, size = cell.channels, cell.size
        if cell.reduction_prev:
            const += measure(
                ("fr", cell.c_prev_prev, c, cell.size_prev_prev),
                lambda: ops_lib.FactorizedReduce(c, affine=True),
                (cell.size_prev_prev,) * 2 + (cell.c_prev_prev,))
        else:
            const += measure(
                ("rcb", cell.c_prev_prev, c, cell.size_prev_prev),
                lambda: ops_lib.ReLUConvBN(c, 1, 1, affine=True),
                (cell.size_prev_prev,) * 2 + (cell.c_prev_prev,))
        const += measure(
            ("rcb", cell.c_prev, c, size),
            lambda: ops_lib.ReLUConvBN(c, 1, 1, affine=True),
            (size, size, cell.c_prev))
        reduced = (size + 1) // 2
        table = tables[cell.reduction]
        for e, (_, j) in enumerate(edges):
            # In a reduction cell only the edges from the two inputs have
            # stride 2; edges between nodes run at the reduced resolution.
            stride = 2 if cell.reduction and j < 2 else 1
            edge_size = reduced if cell.reduction and j >= 2 else size
            for k, name in enumerate(primitives):
                table[e, k] += op_cost(name, c, stride, edge_size)
    const += measure(("classifier", c_last, num_classes),
                     lambda: keras.layers.Dense(num_classes), (c_last,))
    return ResourceTable(kind, tables[False] / 1e6, tables[True] / 1e6,
                         const / 1e6, unit=1e6, model="measured")


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
    rows = {edge: e for e, edge in enumerate(topology.edge_inputs(steps))}
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


# ---------------------------------------------------------------------------
# The authors' closed forms.


def _check_authors_space(steps, primitives):
    # Their formulas index the 8 DARTS primitives by position and assume
    # 4 nodes (14 edges).
    if tuple(primitives) != tuple(ops_lib.PRIMITIVES) or steps != 4:
        raise ValueError(
            "Expected the DARTS space (4 nodes, primitives "
            f"{list(ops_lib.PRIMITIVES)}) for the authors' cost model. "
            f"Received: steps={steps}, primitives={list(primitives)}")


def _stride2_edges(steps):
    """1.0 on the edges from the cell inputs (stride 2 in a reduction cell):
    the authors' ``[1,1,1,1,0,1,1,0,0,1,1,0,0,0]``."""
    return np.array([1.0 if j < 2 else 0.0
                     for _, j in topology.edge_inputs(steps)])


def authors_table(kind, *, channels, layers, steps=4,
                  primitives=ops_lib.PRIMITIVES):
    """The authors' closed-form cost table (published run), supernet scale.

    Their ``param_number`` / ``cal_flops`` sum, over the cells of a network
    of ``layers`` cells and initial width ``channels`` (their supernet:
    8 cells, C=16), ``softmax(alpha) * u`` with one ``u[op]`` per cell
    width ``c`` and every one of the 14 edges:

    - params (/1e5): ``sep_conv_3x3 2(c^2+11c)``, ``sep_conv_5x5
      2(c^2+27c)``, ``dil_conv_3x3 c^2+11c``, ``dil_conv_5x5 c^2+27c``,
      parameter-free ops 0; in a reduction cell ``skip_connect`` adds
      ``c^2+2c`` (a FactorizedReduce) on the 8 stride-2 edges. At uniform
      alpha, 8 cells and C=16 this is 2.358; all sep_conv_5x5, 6.863.
    - flops (/1e8): ``avg_pool_3x3 1024c^2``, ``sep_conv_3x3
      26952c+2048c^2``, ``sep_conv_5x5 69920c+2048c^2``, ``dil_conv_3x3
      13476c+1024c^2``, ``dil_conv_5x5 39172c+1024c^2``, max pooling and
      skip 0; reduction ``skip_connect`` adds ``256c^2+2048c`` on the
      stride-2 edges. These are the authors' numbers as committed
      (resolution-independent: one 32x32 map for every cell; average
      pooling quadratic in ``c``); we reproduce them, not correct them.

    Args:
        kind: ``params`` or ``flops``.
        channels: initial channels ``C``.
        layers: number of cells.
        steps: nodes per cell (must be 4).
        primitives: must be DARTS' 8, in DARTS' order.

    Returns:
        A `ResourceTable` with ``unit`` 1e5 (params) or 1e8 (flops) and
        ``const`` 0 (the formulas count edges only).

    Reference:
        github.com/yuezhixiong/NAS-Benchmark, DARTS/architect.py at commit
        9b66e4d (the published genotype's run), ``param_number`` lines
        75-122 and ``cal_flops`` lines 124-147.
    """
    if kind not in KINDS:
        raise ValueError(
            f"Expected `kind` in {list(KINDS)}. Received: kind={kind!r}")
    _check_authors_space(steps, primitives)
    ops_lib._check_positive_int("channels", channels)
    ops_lib._check_positive_int("layers", layers)
    stride2 = _stride2_edges(steps)
    edges = len(stride2)
    tables = {False: np.zeros((edges, 8)), True: np.zeros((edges, 8))}
    for cell in topology.cell_plan(channels, layers)[0]:
        c, reduction = cell.channels, cell.reduction
        if kind == "params":
            per_op = [0, 0, 0, 0, 2 * (c * c + 11 * c), 2 * (c * c + 27 * c),
                      c * c + 11 * c, c * c + 27 * c]
            skip_reduce = c * c + 2 * c
        else:
            per_op = [0, 0, 1024 * c * c, 0, 26952 * c + 2048 * c * c,
                      69920 * c + 2048 * c * c, 13476 * c + 1024 * c * c,
                      39172 * c + 1024 * c * c]
            skip_reduce = 256 * c * c + 2048 * c
        u = np.tile(np.array(per_op, np.float64), (edges, 1))
        if reduction:
            u[:, 3] += stride2 * skip_reduce
        tables[reduction] += u
    unit = 1e5 if kind == "params" else 1e8
    return ResourceTable(kind, tables[False] / unit, tables[True] / unit, 0.0,
                         unit=unit, model="authors")


def authors_v1_table(kind, *, channels, layers, steps=4,
                     primitives=ops_lib.PRIMITIVES):
    """The first version's parameter formula (Nov 2020), raw counts.

    ``param_number`` of the first version sums, per cell,
    ``2 * (alpha @ u).sum(1) / indegree(edge)``: ``u[op, :]`` repeats the
    op's count 14 times (``sep_conv_3x3 2(c^2+9c)``, ``sep_conv_5x5
    2(c^2+25c)``, ``dil_conv_3x3 c^2+9c``, ``dil_conv_5x5 c^2+25c``: batch
    norms not counted) and, in a reduction cell, adds ``c^2`` to
    ``skip_connect`` in the 8 stride-2 columns. Because the matrix product
    sums over those 14 columns, every edge's op costs 14 times its count
    (skip in a reduction cell: ``8 c^2`` on any edge), and the ``2 /
    indegree`` weighting makes each node count as its two kept edges: this
    table has those entries, so `expected_cost` reproduces their value
    exactly (1,831,168 at uniform alpha, 8 cells, C=16). Params only.

    Args:
        kind: must be ``params``.
        channels, layers, steps, primitives: as `authors_table`.

    Returns:
        A `ResourceTable` with ``unit`` 1 (raw counts), ``const`` 0.

    Reference:
        github.com/yuezhixiong/NAS-Benchmark, DARTS_LBJ/architect.py at
        commit 98da776 ("after CVPR2021"), ``param_number`` lines 65-90.
    """
    if kind != "params":
        raise ValueError(
            "Expected kind='params' for the first version's cost model (it "
            f"has no FLOPs formula). Received: kind={kind!r}")
    _check_authors_space(steps, primitives)
    ops_lib._check_positive_int("channels", channels)
    ops_lib._check_positive_int("layers", layers)
    edges = topology.edge_inputs(steps)
    indegree = np.array([i + 2 for i, _ in edges], np.float64)
    columns = len(edges)
    stride2_columns = _stride2_edges(steps).sum()
    tables = {False: np.zeros((columns, 8)), True: np.zeros((columns, 8))}
    for cell in topology.cell_plan(channels, layers)[0]:
        c, reduction = cell.channels, cell.reduction
        per_op = np.array([0, 0, 0, 0, 2 * (c * c + 9 * c),
                           2 * (c * c + 25 * c), c * c + 9 * c,
                           c * c + 25 * c], np.float64) * columns
        if reduction:
            per_op[3] += stride2_columns * c * c
        tables[reduction] += 2.0 * per_op[None, :] / indegree[:, None]
    return ResourceTable(kind, tables[False], tables[True], 0.0, unit=1.0,
                         model="authors_v1")


def make_table(cost_model, kind, *, channels, layers, num_classes,
               image_size, steps=4, multiplier=4, stem_multiplier=3,
               primitives=ops_lib.PRIMITIVES):
    """The `ResourceTable` of a cost model (one of `COST_MODELS`).

    ``channels`` and ``layers`` are the scale the costs refer to
    (``config.resource``), never the supernet's own: a target then means
    the same whatever scale one searches at. ``num_classes``,
    ``image_size``, ``multiplier`` and ``stem_multiplier`` matter to the
    measured model only (the authors' formulas ignore them).
    """
    if cost_model == "measured":
        return measured_table(
            kind, channels=channels, layers=layers, num_classes=num_classes,
            image_size=image_size, steps=steps, multiplier=multiplier,
            stem_multiplier=stem_multiplier, primitives=primitives)
    if cost_model == "authors":
        return authors_table(kind, channels=channels, layers=layers,
                             steps=steps, primitives=primitives)
    if cost_model == "authors_v1":
        return authors_v1_table(kind, channels=channels, layers=layers,
                                steps=steps, primitives=primitives)
    raise ValueError(
        f"Expected a cost model in {list(COST_MODELS)}. "
        f"Received: cost_model={cost_model!r}")


# ---------------------------------------------------------------------------
# Estimates: how alpha weights the table.


def derived_weights(weights, steps, primitives=ops_lib.PRIMITIVES):
    """0/1 op weights of the genotype the DARTS rule derives, in the graph.

    The same rule as `genotypes.derive`: for every node keep the two
    incoming edges whose strongest non-``none`` op weight is largest (ties
    to the earlier input), each with that op (ties to the earlier op).
    With these weights `expected_cost` is the derived network's cost.

    Args:
        weights: ``[num_edges(steps), len(primitives)]`` op weights (the
            softmax of alpha).
        steps: intermediate nodes per cell.
        primitives: op names in column order.

    Returns:
        A float tensor like ``weights``, 1 at each kept (edge, op), else 0;
        no gradient.
    """
    primitives = tuple(primitives)
    weights = tf.stop_gradient(tf.convert_to_tensor(weights))
    allowed = tf.constant([p != "none" for p in primitives])
    masked = tf.where(allowed[None, :], weights,
                      tf.constant(-np.inf, weights.dtype))
    strength = tf.reduce_max(masked, axis=1)
    best_op = tf.one_hot(tf.argmax(masked, axis=1, output_type=tf.int32),
                         len(primitives), dtype=weights.dtype)
    kept, start = [], 0
    for i in range(steps):
        n = i + 2
        # top_k returns equal values lower index first: DARTS' stable sort.
        _, chosen = tf.math.top_k(strength[start:start + n], k=2)
        kept.append(tf.reduce_sum(tf.one_hot(chosen, n, dtype=weights.dtype),
                                  axis=0))
        start += n
    return tf.concat(kept, axis=0)[:, None] * best_op


def gumbel_hard(logits, tau, seed):
    """A hard Gumbel-softmax sample per row, with a straight-through gradient.

    ``y = softmax((logits + g) / tau)`` with ``g`` standard Gumbel noise;
    the value is ``one_hot(argmax y)``, the gradient that of ``y``.

    Args:
        logits: ``[rows, K]`` float tensor. (The authors pass the softmax of
            alpha here, not alpha: `resource_cost` does the same.)
        tau: temperature (the authors' ``GumbelA``: 0.1).
        seed: ``[2]`` integer tensor of the stateless noise.

    Returns:
        A tensor like ``logits``.

    Reference:
        https://arxiv.org/abs/1611.01144
    """
    logits = tf.convert_to_tensor(logits)
    unit = tf.random.stateless_uniform(
        tf.shape(logits), seed=tf.cast(seed, tf.int64), minval=1e-10,
        maxval=1.0, dtype=logits.dtype, alg="philox")
    gumbel = -tf.math.log(-tf.math.log(unit))
    soft = tf.nn.softmax((logits + gumbel) / tau, axis=-1)
    hard = tf.one_hot(tf.argmax(soft, axis=-1, output_type=tf.int32),
                      tf.shape(logits)[-1], dtype=soft.dtype)
    return soft + tf.stop_gradient(hard - soft)


def resource_cost(alpha_normal, alpha_reduce, table, estimate="expected", *,
                  steps=4, primitives=ops_lib.PRIMITIVES, tau=0.1,
                  seed=None):
    """The resource cost of the architecture ``alpha``, differentiable.

    Args:
        alpha_normal, alpha_reduce: ``[num_edges, num_ops]`` alphas.
        table: a `ResourceTable`.
        estimate: one of `ESTIMATES`:
            ``expected``: `expected_cost` of ``softmax(alpha)`` (the
            paper; over all 14 edges, so at uniform alpha it counts 14/8 of
            a derived cell's edges);
            ``derived``: the value is the cost of the genotype the DARTS
            rule derives from ``softmax(alpha)`` (`derived_weights`), the
            gradient that of ``expected`` (straight-through), so a target
            means the size of the network one will actually retrain;
            ``gumbel``: the cost of a hard Gumbel-softmax sample of one op
            per edge (`gumbel_hard` of ``softmax(alpha)``, as the authors'
            ``temperature=GumbelA``), gradient straight-through.
        steps: intermediate nodes per cell (``derived``).
        primitives: op names in column order (``derived``).
        tau: Gumbel temperature (``gumbel``).
        seed: ``[2]`` integer tensor (``gumbel``); the two cells draw from
            ``seed`` and ``seed + [0, 1 << 20]``.

    Returns:
        A float32 scalar in the table's units.
    """
    if estimate not in ESTIMATES:
        raise ValueError(
            f"Expected an estimate in {list(ESTIMATES)}. "
            f"Received: estimate={estimate!r}")
    w_normal = tf.nn.softmax(tf.cast(alpha_normal, tf.float32), axis=-1)
    w_reduce = tf.nn.softmax(tf.cast(alpha_reduce, tf.float32), axis=-1)
    if estimate == "gumbel":
        if seed is None:
            raise ValueError("Expected a `seed` for estimate='gumbel'.")
        seed = tf.cast(seed, tf.int64)
        return expected_cost(
            gumbel_hard(w_normal, tau, seed),
            gumbel_hard(w_reduce, tau, seed + tf.constant([0, 1 << 20],
                                                          tf.int64)),
            table)
    expected = expected_cost(w_normal, w_reduce, table)
    if estimate == "expected":
        return expected
    derived = expected_cost(derived_weights(w_normal, steps, primitives),
                            derived_weights(w_reduce, steps, primitives),
                            table)
    return expected + tf.stop_gradient(derived - expected)
