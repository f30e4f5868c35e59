"""The DARTS supernet: mixed ops, search cells and the search network.

Reference:
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
    Liu, Simonyan, Yang. DARTS. https://arxiv.org/abs/1806.09055
"""

from __future__ import annotations

import keras
import tensorflow as tf

from e2rnas_tf.space import ops as ops_lib
from e2rnas_tf.space import topology
from e2rnas_tf.space.fused_cell import FusedSearchCell

_PACKAGE = "e2rnas_tf"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MixedOp(keras.layers.Layer):
    """One edge of the supernet: a weighted sum of every candidate op.

    The ``none`` op contributes exactly zero (and so does its gradient
    w.r.t. its weight), so it is not computed at all. Pooling ops are
    followed by a non-affine batch norm, as in DARTS, to put them on the
    scale of the convolutions.

    Args:
        channels: input and output channels.
        stride: 1 or 2.
        primitives: candidate op names, in the order of the weight vector.

    Call arguments:
        inputs: ``[N, H, W, channels]``.
        weights: ``[len(primitives)]`` op weights (softmax of alpha).
        training: batch statistics in the batch norms if true.
    """

    def __init__(self, channels, stride=1, primitives=ops_lib.PRIMITIVES,
                 **kwargs):
        super().__init__(**kwargs)
        ops_lib._check_positive_int("channels", channels)
        self.channels = int(channels)
        self.stride = ops_lib._check_stride(stride)
        self.primitives = ops_lib.check_primitives(primitives)
        self.candidates = []
        self.pool_bns = {}
        for name in self.primitives:
            if name == "none":
                self.candidates.append(None)
                continue
            op = ops_lib.make_op(name, channels, stride, affine=False,
                                 layer_name=name)
            self.candidates.append(op)
            if "pool" in name:
                self.pool_bns[name] = ops_lib.BatchNorm(
                    affine=False, name=f"{name}_bn")

    def build(self, input_shape):
        out_shape = ops_lib._strided_shape(input_shape, self.stride,
                                           self.channels)
        for name, op in zip(self.primitives, self.candidates):
            if op is not None:
                op.build(input_shape)
            if name in self.pool_bns:
                self.pool_bns[name].build(out_shape)

    def call(self, inputs, weights, training=False):
        # One unstack instead of a strided slice per op keeps the graph small.
        weights = tf.unstack(weights, num=len(self.primitives))
        total = None
        for k, (name, op) in enumerate(zip(self.primitives, self.candidates)):
            if op is None:
                continue
            if name in self.pool_bns:
                y = self.pool_bns[name](op(inputs), training=training)
            else:
                y = op(inputs, training=training) if _takes_training(op) \
                    else op(inputs)
            term = weights[k] * y
            total = term if total is None else total + term
        if total is None:  # every candidate is `none`
            total = tf.zeros_like(ops_lib._subsample(inputs, self.stride))
        return total

    def compute_output_shape(self, input_shape, weights_shape=None):
        return ops_lib._strided_shape(input_shape, self.stride, self.channels)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, stride=self.stride,
                      primitives=list(self.primitives))
        return config


def _takes_training(op):
    return not isinstance(op, (ops_lib.Identity, ops_lib.Zero, ops_lib.Pool))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SearchCell(keras.layers.Layer):
    """A normal or reduction cell of the supernet.

    Both inputs are preprocessed to ``channels`` channels (a ReLU-1x1
    conv-BN, or a FactorizedReduce for ``s0`` when the previous cell reduced
    the resolution). Intermediate node ``i`` is the sum of mixed ops applied
    to all earlier states; the output concatenates the last ``multiplier``
    nodes, so it has ``multiplier * channels`` channels.

    Args:
        channels: channels of every node.
        reduction: whether this cell halves the resolution.
        reduction_prev: whether the previous cell did.
        steps: intermediate nodes.
        multiplier: nodes concatenated into the output.
        primitives: candidate op names.

    Call arguments:
        s0: output of the cell before the previous one.
        s1: output of the previous cell.
        weights: ``[num_edges(steps), len(primitives)]`` op weights.
        training: batch statistics in the batch norms if true.
    """

    def __init__(self, channels, reduction=False, reduction_prev=False,
                 steps=4, multiplier=4, primitives=ops_lib.PRIMITIVES,
                 **kwargs):
        super().__init__(**kwargs)
        self.channels, self.steps, self.multiplier = ops_lib.check_cell_args(
            channels, steps, multiplier)
        self.reduction = bool(reduction)
        self.reduction_prev = bool(reduction_prev)
        self.primitives = ops_lib.check_primitives(primitives)
        self.preprocess0, self.preprocess1 = ops_lib.cell_preprocess(
            channels, self.reduction_prev, affine=False)
        self.edges = []
        for e, (node, j) in enumerate(topology.edge_inputs(self.steps)):
            stride = 2 if self.reduction and j < 2 else 1
            self.edges.append(MixedOp(channels, stride, self.primitives,
                                      name=f"edge_{node}_{j}"))

    def build(self, s0_shape, s1_shape=None, weights_shape=None):
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        state = self.preprocess1.compute_output_shape(s1_shape)
        # In a reduction cell the intermediate nodes are already reduced.
        node = ops_lib._strided_shape(state, 2 if self.reduction else 1,
                                      self.channels)
        for op, (_, j) in zip(self.edges, topology.edge_inputs(self.steps)):
            op.build(state if j < 2 else node)

    def call(self, s0, s1, weights, training=False):
        weights = tf.unstack(weights, num=len(self.edges))
        states = [self.preprocess0(s0, training=training),
                  self.preprocess1(s1, training=training)]
        offset = 0
        for _ in range(self.steps):
            node = None
            for j, h in enumerate(states):
                y = self.edges[offset + j](h, weights[offset + j],
                                           training=training)
                node = y if node is None else node + y
            offset += len(states)
            states.append(node)
        return tf.concat(states[-self.multiplier:], axis=-1)

    def compute_output_shape(self, s0_shape, s1_shape=None, weights_shape=None):
        stride = 2 if self.reduction else 1
        return ops_lib._strided_shape(s1_shape, stride,
                                      self.multiplier * self.channels)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, reduction=self.reduction,
                      reduction_prev=self.reduction_prev, steps=self.steps,
                      multiplier=self.multiplier,
                      primitives=list(self.primitives))
        return config


# Implementations of a search cell: the same function, see SearchNetwork.
CELL_IMPLS = {"fused": FusedSearchCell, "reference": SearchCell}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SearchNetwork(keras.Model):
    """The E2RNAS / DARTS supernet with its architecture parameters.

    Input pixels in [0, 1] are normalised per channel inside the model; a
    3x3 stem convolution with ``stem_multiplier * channels`` channels is
    followed by ``layers`` cells (reductions at ``layers // 3`` and
    ``2 * layers // 3``, each doubling the channels), global average pooling
    and a linear classifier producing logits.

    The architecture is ``alpha_normal`` and ``alpha_reduce``, each
    ``[num_edges(steps), len(primitives)]``, initialised to
    ``1e-3 * N(0, 1)``. `arch_variables` and `weight_variables` are disjoint
    lists so that each level of the bi-level problem has its own optimizer.

    Args:
        channels: initial channels ``C``.
        num_classes: classifier outputs.
        layers: number of cells.
        steps: intermediate nodes per cell.
        multiplier: nodes concatenated into a cell's output.
        stem_multiplier: stem width as a multiple of ``channels``.
        primitives: candidate op names.
        mean, std: per-channel input normalisation, pixel units.
        alpha_seed: seed of the alpha initialiser (None for random).
        cell_impl: ``"fused"`` (default) builds `fused_cell.FusedSearchCell`
            cells, which compute each op once per state for all of its
            outgoing edges: the same function with a fraction of the graph
            ops, so the search step traces and runs faster (BENCHMARKS.md).
            ``"reference"`` builds one `MixedOp` per edge, as in DARTS; it
            is the readable definition the fused cell is tested against.

    Call arguments:
        inputs: ``[N, H, W, 3]`` images in [0, 1].
        training: batch statistics in the batch norms if true.

    Example:

    >>> net = SearchNetwork(channels=4, num_classes=10, layers=3)
    >>> net(tf.zeros([2, 16, 16, 3])).shape
    TensorShape([2, 10])
    """

    def __init__(self, channels=16, num_classes=10, layers=8, steps=4,
                 multiplier=4, stem_multiplier=3,
                 primitives=ops_lib.PRIMITIVES, mean=(0.0, 0.0, 0.0),
                 std=(1.0, 1.0, 1.0), alpha_seed=None, cell_impl="fused",
                 **kwargs):
        super().__init__(**kwargs)
        if cell_impl not in CELL_IMPLS:
            raise ValueError(
                f"Expected `cell_impl` in {list(CELL_IMPLS)}. "
                f"Received: cell_impl={cell_impl!r}")
        self.cell_impl = cell_impl
        for name, value in (("channels", channels), ("num_classes", num_classes),
                            ("layers", layers), ("steps", steps),
                            ("multiplier", multiplier),
                            ("stem_multiplier", stem_multiplier)):
            ops_lib._check_positive_int(name, value)
        if layers < 3:
            # With fewer than 3 cells the two reductions would coincide.
            raise ValueError(
                f"Expected `layers` >= 3. Received: layers={layers}")
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.num_layers = int(layers)
        self.steps = int(steps)
        self.multiplier = int(multiplier)
        self.stem_multiplier = int(stem_multiplier)
        self.primitives = ops_lib.check_primitives(primitives)
        self.alpha_seed = None if alpha_seed is None else int(alpha_seed)
        self.normalize = ops_lib.Normalize(mean, std, name="normalize")
        c_curr = self.stem_multiplier * self.channels
        self.stem_conv = keras.layers.Conv2D(
            c_curr, 3, padding="same", use_bias=False,
            kernel_initializer="he_normal", name="stem_conv")
        self.stem_bn = ops_lib.BatchNorm(affine=True, name="stem_bn")
        cell_cls = CELL_IMPLS[self.cell_impl]
        plan, _ = topology.cell_plan(self.channels, self.num_layers,
                                     multiplier=self.multiplier,
                                     stem_multiplier=self.stem_multiplier)
        self.cells = [
            cell_cls(spec.channels, spec.reduction, spec.reduction_prev,
                     self.steps, self.multiplier, self.primitives,
                     name=f"cell_{spec.index}")
            for spec in plan]
        self.classifier = keras.layers.Dense(num_classes, name="classifier")
        shape = (topology.num_edges(self.steps), len(self.primitives))
        # float32 whatever the dtype policy: alpha, its softmax and the
        # architecture objectives are never computed in reduced precision.
        self.alpha_normal = self.add_weight(
            shape=shape, initializer=_alpha_initializer(alpha_seed, 0),
            name="alpha_normal", dtype="float32", autocast=False)
        self.alpha_reduce = self.add_weight(
            shape=shape, initializer=_alpha_initializer(alpha_seed, 1),
            name="alpha_reduce", dtype="float32", autocast=False)

    def build(self, input_shape):
        shape = self.normalize.compute_output_shape(input_shape)
        self.stem_conv.build(shape)
        shape = self.stem_conv.compute_output_shape(shape)
        self.stem_bn.build(shape)
        s0 = s1 = shape
        for cell in self.cells:
            cell.build(s0, s1)
            s0, s1 = s1, cell.compute_output_shape(s0, s1)
        self.classifier.build((input_shape[0], s1[-1]))

    @property
    def arch_variables(self):
        """The architecture parameters ``[alpha_normal, alpha_reduce]``."""
        return [self.alpha_normal, self.alpha_reduce]

    @property
    def weight_variables(self):
        """Every trainable variable that is not an architecture parameter."""
        arch = {id(v) for v in self.arch_variables}
        return [v for v in self.trainable_variables if id(v) not in arch]

    def op_weights(self):
        """Softmax of both alphas, float32: ``(normal, reduce)``."""
        return (tf.nn.softmax(self.alpha_normal.value, axis=-1),
                tf.nn.softmax(self.alpha_reduce.value, axis=-1))

    def call(self, inputs, training=False):
        w_normal, w_reduce = self.op_weights()
        x = self.normalize(inputs)
        s0 = s1 = self.stem_bn(self.stem_conv(x), training=training)
        dtype = s1.dtype
        w_normal = tf.cast(w_normal, dtype)
        w_reduce = tf.cast(w_reduce, dtype)
        for cell in self.cells:
            weights = w_reduce if cell.reduction else w_normal
            s0, s1 = s1, cell(s0, s1, weights, training=training)
        pooled = tf.reduce_mean(s1, axis=[1, 2])
        logits = self.classifier(pooled)
        return tf.cast(logits, tf.float32)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {
            "name": self.name,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "layers": self.num_layers,
            "steps": self.steps,
            "multiplier": self.multiplier,
            "stem_multiplier": self.stem_multiplier,
            "primitives": list(self.primitives),
            "mean": list(self.normalize.mean),
            "std": list(self.normalize.std),
            "alpha_seed": self.alpha_seed,
            "cell_impl": self.cell_impl,
        }


def _alpha_initializer(seed, index):
    # One initialiser per alpha: a Keras initialiser returns the same tensor
    # on every call (seeded or not), so sharing one would start the normal
    # and the reduction cell from identical alphas.
    seed = None if seed is None else int(seed) + index
    return keras.initializers.RandomNormal(stddev=1e-3, seed=seed)
