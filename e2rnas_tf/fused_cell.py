"""A search cell with the same function as `SearchCell` but far fewer ops.

In a DARTS cell every state (the two preprocessed inputs, then each
intermediate node) feeds several edges, and all of those edges apply the
same candidate ops to the same tensor. `FusedSearchCell` therefore computes
each op type once per state for all of that state's outgoing edges:

* parameter-free ops (max/avg pooling with their non-affine batch norm, the
  stride-1 skip connection) give the same output on every edge, so they are
  computed once and broadcast;
* the ReLU that starts every convolutional op is computed once;
* the depthwise convolutions of ``M`` edges are one depthwise convolution
  with channel multiplier ``M``, their 1x1 convolutions one (block-diagonal
  or batched) matrix product, their batch norms one fused call over
  ``M * channels`` channels (batch norm is per channel, so this is exactly
  the per-edge normalisation);
* the op weight ``w[e, k]`` is folded into the scale of the last (otherwise
  non-affine) batch norm of each op, which costs nothing.

The graph of a 4-step cell shrinks from about 14 x 8 small Keras layers to a
few dozen raw ops per state, which cuts tracing and graph building time (the
dominant start-up cost of a search step) and per-op runtime overhead.

Batch-norm statistics: a pooling op's batch norm sees the same tensor on
every edge of a state, so in the reference all those edges' moving
statistics receive identical updates and stay equal (they all start at
0 / 1). This cell keeps one set per state and pooling op, which therefore
equals each of the reference's per-edge sets. Trainable parameters are the
same numbers as in `SearchCell`, only rearranged (see `load_from_reference`
and `load_into_reference`); checkpoints of the two cells are not
interchangeable without those converters.

Reference:
    Liu, Simonyan, Yang. DARTS: Differentiable Architecture Search.
    https://arxiv.org/abs/1806.09055
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from e2rnas_tf import ops as ops_lib
from e2rnas_tf import search_space

_PACKAGE = "e2rnas_tf"

# Above this many channels per edge the block-diagonal 1x1 product (which
# does `M` times the necessary multiply-adds but needs no transposes) loses
# to a transposed batched matmul on CPU (measured at M=4: block-diagonal
# 2x faster at 8-16 channels, equal at 32, 2.5x slower at 64).
_BLOCK_DIAGONAL_MAX_CHANNELS = 32

_CONV_SPECS = {
    # name: (kernel_size, dilation, separable)
    "sep_conv_3x3": (3, 1, True),
    "sep_conv_5x5": (5, 1, True),
    "dil_conv_3x3": (3, 2, False),
    "dil_conv_5x5": (5, 2, False),
}


def state_plan(steps, reduction):
    """Outgoing edges of every state of a cell.

    Args:
        steps: intermediate nodes of the cell.
        reduction: whether the edges leaving the two inputs have stride 2.

    Returns:
        A list with one ``(stride, targets, edges)`` tuple per state that
        has outgoing edges (states ``0 .. steps``): the nodes it feeds and
        the alpha rows of those edges, in the same order.

    Example:

    >>> state_plan(2, False)[1]
    (1, (0, 1), (1, 3))
    """
    ops_lib._check_positive_int("steps", steps)
    plan = []
    for j in range(steps + 1):
        targets = tuple(range(max(0, j - 1), steps))
        edges = tuple(2 * i + i * (i - 1) // 2 + j for i in targets)
        stride = 2 if reduction and j < 2 else 1
        plan.append((stride, targets, edges))
    return plan


def _he_normal(fan_in):
    # keras.initializers.HeNormal on the reference's per-edge kernel shape;
    # the fused shapes would give Keras a different fan-in.
    return keras.initializers.TruncatedNormal(
        stddev=math.sqrt(2.0 / fan_in) / 0.87962566103423978)


def _depthwise(x, kernel, kernel_size, stride, dilation):
    """Depthwise convolution with `ops.DilConv`'s PyTorch-aligned padding."""
    pad = dilation * (kernel_size // 2)
    if stride == 1:
        return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME",
                                      dilations=[dilation, dilation])
    if dilation == 1:
        return tf.nn.depthwise_conv2d(
            x, kernel, [1, 2, 2, 1], [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    # No TF kernel has stride 2 with dilation 2; reading every other pixel
    # of the padded input with an undilated kernel is the same convolution.
    x = ops_lib._pad_hw(x, pad)[:, ::2, ::2, :]
    return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")


def batched_pointwise(x, kernels, edge_major):
    """Per-edge 1x1 convolutions of ``M`` edges stacked along channels.

    Args:
        x: ``[N, H, W, M * C]``. Channel ``m * C + c`` holds edge ``m``'s
            channel ``c`` if `edge_major`, else channel ``c * M + m`` does
            (the layout a depthwise convolution with multiplier ``M``
            produces).
        kernels: ``[M, C, D]``, edge ``m``'s 1x1 kernel.
        edge_major: layout of `x`, see above.

    Returns:
        ``[N, H, W, M * D]``, edge-major: channel ``m * D + d`` is
        ``sum_c x[edge m, channel c] * kernels[m, c, d]``.
    """
    num, c_in, c_out = kernels.shape
    height, width = x.shape[1], x.shape[2]
    flat = tf.reshape(x, [-1, num * c_in])
    if num == 1:
        y = tf.matmul(flat, tf.reshape(kernels, [c_in, c_out]))
    elif c_in <= _BLOCK_DIAGONAL_MAX_CHANNELS:
        eye = tf.eye(num, dtype=kernels.dtype)
        pattern = "mcd,mn->mcnd" if edge_major else "mcd,mn->cmnd"
        kernel = tf.reshape(tf.einsum(pattern, kernels, eye),
                            [num * c_in, num * c_out])
        y = tf.matmul(flat, kernel)
    else:
        shape = [-1, num, c_in] if edge_major else [-1, c_in, num]
        perm = [1, 0, 2] if edge_major else [2, 0, 1]
        y = tf.matmul(tf.transpose(tf.reshape(flat, shape), perm), kernels)
        y = tf.transpose(y, [1, 0, 2])
    return tf.reshape(y, [-1, height, width, num * c_out])


def _pool(x, kind, stride):
    """`ops.Pool` without the Keras layer."""
    if stride == 1:
        pool = tf.nn.max_pool2d if kind == "max" else tf.nn.avg_pool2d
        return pool(x, 3, 1, "SAME")
    if kind == "max":
        return tf.nn.max_pool2d(x, 3, 2, [[0, 0], [1, 1], [1, 1], [0, 0]])
    scale = ops_lib._avg_pool_scale(x.shape[1], x.shape[2])
    y = tf.nn.avg_pool2d(ops_lib._pad_hw(x, 1), 3, 2, "VALID")
    return y * tf.constant(scale, dtype=y.dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FusedSearchCell(keras.layers.Layer):
    """`search_space.SearchCell` computed per state instead of per edge.

    Same arguments, call signature and output as `SearchCell`; only the
    layout of the parameters differs (the trainable ones are the same
    numbers, rearranged: see `load_from_reference`). See the module
    docstring for how the ops are batched.

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

    Example:

    >>> cell = FusedSearchCell(4)
    >>> x = tf.zeros([2, 8, 8, 4])
    >>> cell(x, x, tf.fill([14, 8], 0.125)).shape
    TensorShape([2, 8, 8, 16])

    Reference:
        Liu, Simonyan, Yang. DARTS. https://arxiv.org/abs/1806.09055
    """

    def __init__(self, channels, reduction=False, reduction_prev=False,
                 steps=4, multiplier=4, primitives=ops_lib.PRIMITIVES,
                 **kwargs):
        super().__init__(**kwargs)
        ops_lib._check_positive_int("channels", channels)
        ops_lib._check_positive_int("steps", steps)
        ops_lib._check_positive_int("multiplier", multiplier)
        if multiplier > steps:
            raise ValueError(
                "Expected `multiplier` <= `steps`. "
                f"Received: multiplier={multiplier}, steps={steps}")
        self.channels = int(channels)
        self.reduction = bool(reduction)
        self.reduction_prev = bool(reduction_prev)
        self.steps = int(steps)
        self.multiplier = int(multiplier)
        self.primitives = search_space._check_primitives(primitives)
        if self.reduction and "skip_connect" in self.primitives \
                and self.channels % 2:
            raise ValueError(
                "Expected even `channels` for a reduction cell with "
                f"skip_connect. Received: channels={channels}")
        # Sublayers follow this cell's dtype policy (under a global policy
        # they would anyway).
        policy = self.dtype_policy
        if self.reduction_prev:
            self.preprocess0 = ops_lib.FactorizedReduce(
                channels, affine=False, name="preprocess0", dtype=policy)
        else:
            self.preprocess0 = ops_lib.ReLUConvBN(
                channels, 1, 1, affine=False, name="preprocess0",
                dtype=policy)
        self.preprocess1 = ops_lib.ReLUConvBN(
            channels, 1, 1, affine=False, name="preprocess1", dtype=policy)
        self._plan = state_plan(self.steps, self.reduction)

    # -- parameters ---------------------------------------------------------

    def _is_per_edge(self, name, stride):
        """Whether op `name` has its own parameters or statistics per edge."""
        return name in _CONV_SPECS or (name == "skip_connect" and stride == 2)

    def _stats(self, prefix, size):
        mean = self.add_weight(shape=(size,), initializer="zeros",
                               name=f"{prefix}_moving_mean", trainable=False,
                               autocast=False)
        var = self.add_weight(shape=(size,), initializer="ones",
                              name=f"{prefix}_moving_variance",
                              trainable=False, autocast=False)
        return mean, var

    def build(self, s0_shape, s1_shape=None, weights_shape=None):
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        c = self.channels
        # self._params[j][name] maps a role to a variable (a pair of
        # variables for batch-norm statistics).
        self._params = []
        for j, (stride, targets, _) in enumerate(self._plan):
            m = len(targets)
            params = {}
            for name in self.primitives:
                prefix = f"s{j}_{name}"
                if name in ("max_pool_3x3", "avg_pool_3x3"):
                    params[name] = {"bn": self._stats(prefix, c)}
                elif name == "skip_connect" and stride == 2:
                    init = _he_normal(c)
                    params[name] = {
                        "kernel_1": self.add_weight(
                            shape=(m, c, c // 2), initializer=init,
                            name=f"{prefix}_kernel_1"),
                        "kernel_2": self.add_weight(
                            shape=(m, c, c // 2), initializer=init,
                            name=f"{prefix}_kernel_2"),
                        "bn": self._stats(prefix, m * c),
                    }
                elif name in _CONV_SPECS:
                    k, _, separable = _CONV_SPECS[name]
                    blocks = [("", (k, k, c, m))]
                    if separable:
                        blocks = [("1", (k, k, c, m)), ("2", (k, k, m * c, 1))]
                    entry = {}
                    for tag, dw_shape in blocks:
                        entry[f"depthwise{tag}"] = self.add_weight(
                            shape=dw_shape, initializer=_he_normal(k * k * c),
                            name=f"{prefix}_depthwise{tag}")
                        entry[f"pointwise{tag}"] = self.add_weight(
                            shape=(m, c, c), initializer=_he_normal(c),
                            name=f"{prefix}_pointwise{tag}")
                        entry[f"bn{tag}"] = self._stats(f"{prefix}{tag}", m * c)
                    params[name] = entry
            self._params.append(params)

    # -- forward --------------------------------------------------------------

    def _read(self, variable):
        # An explicit read and cast: some TF ops given a Keras variable read
        # its float32 handle directly, skipping the layer's autocast.
        return tf.cast(variable.value, self.compute_dtype)

    def _batch_norm(self, x, stats, scale, training):
        """Non-affine BN of `x`, times `scale` (float32, one per channel)."""
        mean, var = stats
        offset = tf.zeros([x.shape[-1]], tf.float32)
        if training:
            momentum = ops_lib.BN_MOMENTUM
            y, new_mean, new_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=scale, offset=offset, mean=mean.value,
                variance=var.value, epsilon=ops_lib.BN_EPSILON,
                exponential_avg_factor=1.0 - momentum, data_format="NHWC",
                is_training=True)
            mean.assign(new_mean)
            var.assign(new_var)
            return y
        y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=mean.value,
            variance=var.value, epsilon=ops_lib.BN_EPSILON,
            data_format="NHWC", is_training=False)
        return y

    def _edge_scales(self, weights):
        """Per state and per-edge op: the op weight of each output channel.

        Returns ``scales[j][k]``, ``[M_j * channels]`` float32, channel
        ``m * channels + c`` holding the weight of op ``k`` on state
        ``j``'s ``m``-th edge; and ``rows[j]``, ``[M_j, len(primitives)]``.
        """
        order = [e for _, _, edges in self._plan for e in edges]
        rows = tf.gather(weights, order)  # state-major edge order
        sizes = [len(edges) for _, _, edges in self._plan]
        # Stride-2 skip_connect (FactorizedReduce) only in reduction cells.
        per_edge = [k for k, name in enumerate(self.primitives)
                    if self._is_per_edge(name, 2 if self.reduction else 1)]
        scales = [dict() for _ in self._plan]
        if per_edge:
            cols = tf.transpose(tf.gather(rows, per_edge, axis=1))
            c = self.channels
            shape = [len(per_edge), len(order), c]
            cols = tf.reshape(tf.broadcast_to(cols[:, :, None], shape),
                              [shape[0], shape[1] * c])
            for k, col in zip(per_edge, tf.unstack(cols)):
                for j, part in enumerate(
                        tf.split(col, [s * c for s in sizes])):
                    scales[j][k] = part
        return scales, tf.split(rows, sizes)

    def _state_output(self, x, j, scales, rows, training):
        """Sum over ops of state `j`'s weighted outputs, ``[.., M * C]``."""
        stride, targets, _ = self._plan[j]
        m, c = len(targets), self.channels
        params = self._params[j]
        relu = None
        per_edge, shared, shared_k = [], [], []
        for k, name in enumerate(self.primitives):
            if name == "none":
                continue
            if not self._is_per_edge(name, stride):
                if name == "skip_connect":
                    y = x
                else:
                    y = self._batch_norm(
                        _pool(x, name[:3], stride), params[name]["bn"],
                        tf.ones([c], tf.float32), training)
                shared.append(y)
                shared_k.append(k)
                continue
            if relu is None:
                relu = tf.nn.relu(x)
            p = params[name]
            if name == "skip_connect":
                # FactorizedReduce of every edge: one 1x1 stride-2
                # convolution per branch producing all edges' halves.
                shifted = tf.pad(relu, [[0, 0], [0, 1], [0, 1], [0, 0]])
                shifted = shifted[:, 1:, 1:, :]
                halves = []
                for branch, key in ((relu, "kernel_1"), (shifted, "kernel_2")):
                    kernel = tf.transpose(self._read(p[key]), [1, 0, 2])
                    y = tf.nn.conv2d(branch, tf.reshape(kernel, [1, 1, c, -1]),
                                     2, "VALID")
                    halves.append(tf.reshape(
                        y, [-1, y.shape[1], y.shape[2], m, c // 2]))
                y = tf.concat(halves, axis=-1)
                y = tf.reshape(y, [-1, y.shape[1], y.shape[2], m * c])
                per_edge.append(self._batch_norm(y, p["bn"], scales[k],
                                                 training))
                continue
            size, dilation, separable = _CONV_SPECS[name]
            ones = tf.ones([m * c], tf.float32)
            tag = "1" if separable else ""
            y = _depthwise(relu, self._read(p[f"depthwise{tag}"]), size, stride,
                           dilation)
            y = batched_pointwise(y, self._read(p[f"pointwise{tag}"]),
                                  edge_major=False)
            if separable:
                y = self._batch_norm(y, p["bn1"], ones, training)
                y = _depthwise(tf.nn.relu(y), self._read(p["depthwise2"]), size,
                               1, 1)
                y = batched_pointwise(y, self._read(p["pointwise2"]),
                                      edge_major=True)
                y = self._batch_norm(y, p["bn2"], scales[k], training)
            else:
                y = self._batch_norm(y, p["bn"], scales[k], training)
            per_edge.append(y)
        if shared:
            # out[.., m*C + d] = sum_k w[m, k] * shared_k[.., d]: one matmul
            # with the Kronecker product of the weights and an identity.
            w = tf.gather(rows, shared_k, axis=1)
            kernel = tf.einsum("mk,cd->kcmd", w, tf.eye(c, dtype=w.dtype))
            kernel = tf.cast(tf.reshape(kernel, [len(shared) * c, m * c]),
                             x.dtype)
            stacked = shared[0] if len(shared) == 1 \
                else tf.concat(shared, axis=-1)
            height, width = stacked.shape[1], stacked.shape[2]
            y = tf.matmul(tf.reshape(stacked, [-1, len(shared) * c]), kernel)
            per_edge.append(tf.reshape(y, [-1, height, width, m * c]))
        if not per_edge:
            return None
        return per_edge[0] if len(per_edge) == 1 else tf.add_n(per_edge)

    def call(self, s0, s1, weights, training=False):
        weights = tf.cast(weights, tf.float32)
        # The preprocessing BNs follow their own policy (float32 unless a
        # global one is set): bring their outputs to this cell's dtype.
        states = [tf.cast(self.preprocess0(s0, training=training),
                          self.compute_dtype),
                  tf.cast(self.preprocess1(s1, training=training),
                          self.compute_dtype)]
        scales, rows = self._edge_scales(weights)
        inputs = [[] for _ in range(self.steps)]
        for j, (stride, targets, _) in enumerate(self._plan):
            if j >= 2:
                states.append(self._node(inputs[j - 2], states[1]))
            y = self._state_output(states[j], j, scales[j], rows[j], training)
            if y is None:
                continue
            parts = tf.split(y, len(targets), axis=-1) if len(targets) > 1 \
                else [y]
            for i, part in zip(targets, parts):
                inputs[i].append(part)
        states.append(self._node(inputs[-1], states[1]))
        return tf.concat(states[-self.multiplier:], axis=-1)

    def _node(self, inputs, s1):
        if not inputs:  # every candidate is `none`
            stride = 2 if self.reduction else 1
            return tf.zeros_like(ops_lib._subsample(s1, stride))
        return inputs[0] if len(inputs) == 1 else tf.add_n(inputs)

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


# -- conversion to and from SearchCell -------------------------------------

def _layout(fused_cell, reference_cell):
    """``[(fused_variable, kind, reference_variables)]`` for every variable.

    `kind` says how the reference's per-edge variables combine into the
    fused one: "stack_last" (depthwise kernels ``[k, k, C, 1]`` -> ``[k, k,
    C, M]``), "concat_channels" (``[k, k, C, 1]`` -> ``[k, k, M * C, 1]``),
    "stack_1x1" (``[1, 1, C, D]`` -> ``[M, C, D]``), "concat" (statistics
    ``[C]`` -> ``[M * C]``), "shared" (identical per-edge statistics -> one),
    "same" (a one-to-one copy).
    """
    for name in ("channels", "reduction", "reduction_prev", "steps",
                 "multiplier", "primitives"):
        if getattr(fused_cell, name) != getattr(reference_cell, name):
            raise ValueError(
                f"Expected cells with the same `{name}`. Received: "
                f"{getattr(fused_cell, name)!r} and "
                f"{getattr(reference_cell, name)!r}")
    if not (fused_cell.built and reference_cell.built):
        raise ValueError("Expected both cells to be built. Received: "
                         f"fused built={fused_cell.built}, "
                         f"reference built={reference_cell.built}")
    layout = []
    for pre in ("preprocess0", "preprocess1"):
        fused_pre = getattr(fused_cell, pre)
        ref_pre = getattr(reference_cell, pre)
        for f, r in zip(fused_pre.variables, ref_pre.variables):
            layout.append((f, "same", [r]))
    for j, (stride, _, edges) in enumerate(fused_cell._plan):
        mixed = [reference_cell.edges[e] for e in edges]
        for k, name in enumerate(fused_cell.primitives):
            if name == "none" or (name == "skip_connect" and stride == 1):
                continue
            p = fused_cell._params[j][name]
            ops = [mo.candidates[k] for mo in mixed]
            if name in ("max_pool_3x3", "avg_pool_3x3"):
                bns = [mo.pool_bns[name] for mo in mixed]
                layout.append((p["bn"][0], "shared",
                               [bn.moving_mean for bn in bns]))
                layout.append((p["bn"][1], "shared",
                               [bn.moving_variance for bn in bns]))
                continue
            if name == "skip_connect":
                layout.append((p["kernel_1"], "stack_1x1",
                               [op.kernel_1 for op in ops]))
                layout.append((p["kernel_2"], "stack_1x1",
                               [op.kernel_2 for op in ops]))
                bns = [op.bn for op in ops]
            else:
                _, _, separable = _CONV_SPECS[name]
                blocks = [("1", [op.block_1 for op in ops], "stack_last"),
                          ("2", [op.block_2 for op in ops],
                           "concat_channels")] if separable \
                    else [("", ops, "stack_last")]
                for tag, convs, dw_kind in blocks:
                    layout.append((p[f"depthwise{tag}"], dw_kind,
                                   [op.depthwise_kernel for op in convs]))
                    layout.append((p[f"pointwise{tag}"], "stack_1x1",
                                   [op.pointwise_kernel for op in convs]))
                    layout.append((p[f"bn{tag}"][0], "concat",
                                   [op.bn.moving_mean for op in convs]))
                    layout.append((p[f"bn{tag}"][1], "concat",
                                   [op.bn.moving_variance for op in convs]))
                continue
            layout.append((p["bn"][0], "concat",
                           [bn.moving_mean for bn in bns]))
            layout.append((p["bn"][1], "concat",
                           [bn.moving_variance for bn in bns]))
    return layout


def _combine(kind, parts):
    if kind == "same":
        return parts[0]
    if kind == "shared":
        return parts[0]
    if kind == "stack_last":
        return tf.concat(parts, axis=-1)
    if kind == "concat_channels":
        return tf.concat(parts, axis=2)
    if kind == "stack_1x1":
        return tf.stack([p[0, 0] for p in parts])
    return tf.concat(parts, axis=0)  # "concat"


def _split(kind, value, count):
    if kind in ("same", "shared"):
        return [value] * count
    if kind == "stack_last":
        return tf.split(value, count, axis=-1)
    if kind == "concat_channels":
        return tf.split(value, count, axis=2)
    if kind == "stack_1x1":
        return [p[None, None] for p in tf.unstack(value, num=count)]
    return tf.split(value, count, axis=0)


def from_reference(fused_cell, reference_cell, fetch=None):
    """Rearranges per-reference-variable tensors into the fused layout.

    Args:
        fused_cell: a built `FusedSearchCell`.
        reference_cell: a built `search_space.SearchCell` with the same
            configuration.
        fetch: maps a reference variable to a tensor of its shape (for
            example its gradient); defaults to the variable's value.

    Returns:
        A list of ``(fused_variable, tensor)`` pairs covering every
        variable of `fused_cell`.
    """
    if fetch is None:
        fetch = lambda v: tf.convert_to_tensor(v.value)  # noqa: E731
    return [(f, _combine(kind, [fetch(r) for r in refs]))
            for f, kind, refs in _layout(fused_cell, reference_cell)]


def load_from_reference(fused_cell, reference_cell):
    """Copies a built `SearchCell`'s variables into a `FusedSearchCell`.

    Pooling statistics are taken from the first edge of each state: they
    are equal on all of a state's edges (see the module docstring).

    Args:
        fused_cell: a built `FusedSearchCell`.
        reference_cell: a built `search_space.SearchCell` with the same
            configuration.

    Example:

    >>> ref = search_space.SearchCell(4)
    >>> fused = FusedSearchCell(4)
    >>> x = tf.zeros([2, 8, 8, 4]); w = tf.fill([14, 8], 0.125)
    >>> _ = ref(x, x, w); _ = fused(x, x, w)
    >>> load_from_reference(fused, ref)
    """
    for variable, value in from_reference(fused_cell, reference_cell):
        variable.assign(tf.cast(value, variable.dtype))


def load_into_reference(reference_cell, fused_cell):
    """The inverse of `load_from_reference`: fused variables into a
    `SearchCell` (pooling statistics are copied to every edge).

    Args:
        reference_cell: a built `search_space.SearchCell`.
        fused_cell: a built `FusedSearchCell` with the same configuration.
    """
    for variable, kind, refs in _layout(fused_cell, reference_cell):
        value = tf.convert_to_tensor(variable.value)
        for ref, part in zip(refs, _split(kind, value, len(refs))):
            ref.assign(tf.cast(part, ref.dtype))
