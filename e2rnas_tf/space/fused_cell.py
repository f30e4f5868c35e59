"""A search cell with the same function as `SearchCell` but far fewer ops.

In a DARTS cell every state (the two preprocessed inputs, then each
intermediate node) feeds several edges, and all of those edges apply the
same candidate ops to the same tensor. `FusedSearchCell` therefore computes
each op type once per state for all of that state's outgoing edges:

* parameter-free ops (max/avg pooling with their non-affine batch norm, the
  stride-1 skip connection) give the same output on every edge, so they are
  computed once, copied per edge and weighted;
* the ReLU that starts every convolutional op is computed once and tiled
  ``M`` times along channels (edge-major: channel ``m * C + c`` belongs to
  edge ``m``), so the depthwise convolutions of ``M`` edges are one
  depthwise convolution over ``M * C`` channels, their 1x1 convolutions
  one grouped convolution, their batch norms one fused call (batch norm is
  per channel, so this is exactly the per-edge normalisation);
* the stride-2 skip connections (FactorizedReduce) of all edges are one
  1x1 stride-2 convolution per branch;
* the op weight ``w[e, k]`` is folded into the scale of the last (otherwise
  non-affine) batch norm of each op, which costs nothing;
* all batch-norm statistics of a state live in one pair of variables (one
  read and one update per state).

That is the default "batched" edge layout. The "split" layout keeps all of
the above except the stacking: its convolutions run per edge on the shared
ReLU (kernels and statistics still read once per state and split). It
computes the same function from the same variables with twice the graph
ops; it was slower in every network-level measurement on 2 CPU cores (even
at batch 64, 32x32, C=16, where single-cell timings had hinted otherwise)
and is kept for hardware where per-edge kernels might win.

The graph of a 4-step cell shrinks from 14 x 8 small Keras layers to a few
dozen raw ops per state (a third of the ops of a whole fwd+bwd step), which
cuts tracing and graph building time (the dominant start-up cost of a
search step) and per-op runtime overhead; see tools/trace_bench.py.

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
import os

import keras
import numpy as np
import tensorflow as tf

from e2rnas_tf.space import ops as ops_lib

# No import of search_space: it may import this module to offer the fused
# cell as an implementation choice of SearchNetwork.

_PACKAGE = "e2rnas_tf"

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
    """Depthwise convolution with `ops.DilConv`'s PyTorch-aligned padding.

    Raw ops: `tf.nn.depthwise_conv2d`'s Python wrapper costs more tracing
    time than the convolution's graph nodes.
    """
    pad = dilation * (kernel_size // 2)
    if dilation == 1:
        return tf.raw_ops.DepthwiseConv2dNative(
            input=x, filter=kernel, strides=[1, stride, stride, 1],
            padding="EXPLICIT", explicit_paddings=[0, 0, pad, pad, pad, pad,
                                                   0, 0])
    if stride == 2:
        # No TF kernel has stride 2 with dilation 2; reading every other
        # pixel of the padded input with an undilated kernel is the same
        # convolution.
        x = ops_lib._pad_hw(x, pad)[:, ::2, ::2, :]
        return tf.raw_ops.DepthwiseConv2dNative(
            input=x, filter=kernel, strides=[1, 1, 1, 1], padding="VALID")
    # Dilation 2, stride 1: the four pixel phases of the padded input as a
    # batch (SpaceToBatch), an undilated VALID convolution, and back. The
    # padding is rounded up to even sizes; the extra rows/columns are
    # cropped at the end. (TF's CPU backprop kernels reject dilations.)
    height, width = x.shape[1], x.shape[2]
    extra_h, extra_w = height % 2, width % 2
    y = tf.raw_ops.SpaceToBatchND(
        input=x, block_shape=[2, 2],
        paddings=[[pad, pad + extra_h], [pad, pad + extra_w]])
    y = tf.raw_ops.DepthwiseConv2dNative(
        input=y, filter=kernel, strides=[1, 1, 1, 1], padding="VALID")
    return tf.raw_ops.BatchToSpaceND(
        input=y, block_shape=[2, 2], crops=[[0, extra_h], [0, extra_w]])


def grouped_pointwise(x, kernel):
    """Per-edge 1x1 convolutions of ``M`` edges stacked along channels.

    Args:
        x: ``[N, H, W, M * C]``, edge-major: channel ``m * C + c`` holds
            edge ``m``'s channel ``c``.
        kernel: ``[1, 1, C, M * D]``; ``kernel[..., m * D : (m + 1) * D]``
            is edge ``m``'s 1x1 kernel.

    Returns:
        ``[N, H, W, M * D]``, edge-major. A grouped convolution where
        TensorFlow can differentiate one (`grouped_conv_differentiable`): on
        CPU it was as fast as or faster than a block-diagonal matmul, a
        batched matmul or per-edge convolutions at 8 to 64 channels.
        Elsewhere (a CPU without oneDNN, float16 on a CPU) the same
        products as an einsum, whose gradient every backend has.
    """
    if grouped_conv_differentiable(x.dtype):
        return tf.nn.conv2d(x, kernel, 1, "VALID")
    c = kernel.shape[2]
    m = x.shape[-1] // c
    d = kernel.shape[3] // m
    lead = tf.shape(x)[:3]
    per_edge = tf.reshape(x, tf.concat([lead, [m, c]], 0))
    kernels = tf.transpose(tf.reshape(kernel, [c, m, d]), [1, 0, 2])
    y = tf.einsum("nhwmc,mcd->nhwmd", per_edge, kernels)
    return tf.reshape(y, tf.concat([lead, [m * d]], 0))


def grouped_conv_differentiable(dtype):
    """Whether TensorFlow has the backprop kernels of a grouped convolution.

    Its CPU kernels have them only through oneDNN (on by default on x86
    Linux; off with ``TF_ENABLE_ONEDNN_OPTS=0`` and in some other builds)
    and not in float16; GPUs (cuDNN) and XLA have them. Read at trace time.
    """
    if tf.config.list_logical_devices("GPU"):
        return True
    try:
        from tensorflow.python.util import _pywrap_util_port
        onednn = _pywrap_util_port.IsMklEnabled()
    except (ImportError, AttributeError):  # a build without the query
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"
    return bool(onednn) and tf.as_dtype(dtype) != tf.float16


def _batch_norm(y, moving_mean, moving_var, scale, training):
    """Non-affine batch norm of `y` times `scale` (float32, per channel).

    Returns ``(output, new moving mean, new moving variance)``; in
    training mode the fused kernel updates the statistics itself (with the
    unbiased batch variance), as `ops.BatchNorm` does.
    """
    channels = y.shape[-1]
    if scale is None:
        scale = tf.ones([channels], tf.float32)
    y, new_mean, new_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=y, scale=scale, offset=tf.zeros([channels], tf.float32),
        mean=moving_mean, variance=moving_var, epsilon=ops_lib.BN_EPSILON,
        exponential_avg_factor=(1.0 - ops_lib.BN_MOMENTUM if training
                                else 1.0),
        data_format="NHWC", is_training=bool(training))
    return y, new_mean, new_var


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
        edge_layout: "batched" (a state's edges stacked along channels)
            or "split" (convolutions per edge on the shared ReLU). Same
            function, same variables; batched has half the graph ops and
            was the faster on 2 CPU cores at every size measured (see
            tools/trace_bench.py).

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
                 edge_layout="batched", **kwargs):
        super().__init__(**kwargs)
        self.channels, self.steps, self.multiplier = ops_lib.check_cell_args(
            channels, steps, multiplier)
        if edge_layout not in ("split", "batched"):
            raise ValueError(
                "Expected `edge_layout` 'batched' or 'split'. "
                f"Received: edge_layout={edge_layout!r}")
        self.edge_layout = edge_layout
        self.reduction = bool(reduction)
        self.reduction_prev = bool(reduction_prev)
        self.primitives = ops_lib.check_primitives(primitives)
        if self.reduction and "skip_connect" in self.primitives \
                and self.channels % 2:
            raise ValueError(
                "Expected even `channels` for a reduction cell with "
                f"skip_connect. Received: channels={channels}")
        # Sublayers follow this cell's dtype policy (under a global policy
        # they would anyway).
        policy = self.dtype_policy
        self.preprocess0, self.preprocess1 = ops_lib.cell_preprocess(
            channels, self.reduction_prev, affine=False, dtype=policy)
        self._plan = state_plan(self.steps, self.reduction)

    # -- parameters ---------------------------------------------------------

    def _is_per_edge(self, name, stride):
        """Whether op `name` has its own parameters or statistics per edge."""
        return name in _CONV_SPECS or (name == "skip_connect" and stride == 2)

    def _bn_slots(self, j):
        """``[(op name, tag, size)]``: the batch norms of state `j`, in the
        order of their statistics in the state's statistics variables."""
        stride, targets, _ = self._plan[j]
        m, c = len(targets), self.channels
        slots = []
        for name in self.primitives:
            if name in ("max_pool_3x3", "avg_pool_3x3"):
                slots.append((name, "", c))
            elif name == "skip_connect" and stride == 2:
                slots.append((name, "", m * c))
            elif name in _CONV_SPECS:
                tags = ("1", "2") if _CONV_SPECS[name][2] else ("",)
                slots.extend((name, tag, m * c) for tag in tags)
        return slots

    def build(self, s0_shape, s1_shape=None, weights_shape=None):
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        c = self.channels
        # self._params[j][name][role]: the kernels of op `name` on state j.
        # self._stats[j]: (moving mean, moving variance) of all of state
        # j's batch norms, concatenated (one read and one update per state
        # instead of one per batch norm keeps the graph small).
        self._params = []
        self._stats = []
        for j, (stride, targets, _) in enumerate(self._plan):
            m = len(targets)
            params = {}
            for name in self.primitives:
                prefix = f"s{j}_{name}"
                if name == "skip_connect" and stride == 2:
                    init = _he_normal(c)
                    params[name] = {
                        key: self.add_weight(
                            shape=(1, 1, c, m * (c // 2)), initializer=init,
                            name=f"{prefix}_{key}")
                        for key in ("kernel_1", "kernel_2")}
                elif name in _CONV_SPECS:
                    k, _, separable = _CONV_SPECS[name]
                    tags = ("1", "2") if separable else ("",)
                    entry = {}
                    for tag in tags:
                        entry[f"depthwise{tag}"] = self.add_weight(
                            shape=(k, k, m * c, 1),
                            initializer=_he_normal(k * k * c),
                            name=f"{prefix}_depthwise{tag}")
                        entry[f"pointwise{tag}"] = self.add_weight(
                            shape=(1, 1, c, m * c), initializer=_he_normal(c),
                            name=f"{prefix}_pointwise{tag}")
                    params[name] = entry
            self._params.append(params)
            total = sum(size for _, _, size in self._bn_slots(j))
            if not total:
                self._stats.append(None)
                continue
            self._stats.append(tuple(
                self.add_weight(shape=(total,), initializer=init,
                                name=f"s{j}_{stat}", trainable=False,
                                autocast=False)
                for stat, init in (("moving_mean", "zeros"),
                                   ("moving_variance", "ones"))))

    # -- forward --------------------------------------------------------------

    def _read(self, variable):
        # An explicit read and cast: some TF ops given a Keras variable read
        # its float32 handle directly, skipping the layer's autocast.
        return tf.cast(variable.value, self.compute_dtype)

    def _edge_scales(self, weights):
        """Per state and op: the op weight of each output channel.

        Returns ``scales[j][k]``, ``[M_j * channels]`` float32, channel
        ``m * channels + c`` holding the weight of op ``k`` on state
        ``j``'s ``m``-th edge.
        """
        order = [e for _, _, edges in self._plan for e in edges]
        sizes = [len(edges) * self.channels for _, _, edges in self._plan]
        num_edges, num_ops = len(order), len(self.primitives)
        # A constant permutation matrix rearranges the rows into state
        # order; it is cheaper to trace and differentiate than a gather.
        perm = np.zeros([num_edges, num_edges], np.float32)
        perm[order, np.arange(num_edges)] = 1.0
        cols = tf.matmul(weights, tf.constant(perm), transpose_a=True)
        shape = [num_ops, num_edges, self.channels]
        cols = tf.reshape(tf.broadcast_to(cols[:, :, None], shape),
                          [num_ops, num_edges * self.channels])
        scales = [dict() for _ in self._plan]
        for k, col in enumerate(tf.unstack(cols, num=num_ops)):
            if self.primitives[k] == "none":
                continue
            for j, part in enumerate(tf.split(col, sizes)):
                scales[j][k] = part
        return scales

    def _state_output(self, x, j, scales, training):
        """Sum over ops of state `j`'s weighted outputs, ``[.., M * C]``."""
        stride, targets, _ = self._plan[j]
        m, c = len(targets), self.channels
        params = self._params[j]
        slots = self._bn_slots(j)
        if slots:
            sizes = [size for _, _, size in slots]
            mean, var = (tf.split(v.value, sizes) if len(sizes) > 1
                         else [v.value] for v in self._stats[j])
            stats = {slot[:2]: pair
                     for slot, pair in zip(slots, zip(mean, var))}
        updates = {}

        def batch_norm(y, name, tag, scale=None):
            y, new_mean, new_var = _batch_norm(y, *stats[(name, tag)], scale,
                                               training)
            updates[(name, tag)] = (new_mean, new_var)
            return y

        relu = tiled = None
        outputs = []
        for k, name in enumerate(self.primitives):
            if name == "none":
                continue
            if not self._is_per_edge(name, stride):
                # Same output on every edge: compute once, copy per edge
                # and weight each copy.
                if name == "skip_connect":
                    y = x
                else:
                    y = batch_norm(ops_lib.pool3x3(x, name[:3], stride),
                                   name, "")
                if m > 1:
                    y = tf.tile(y, [1, 1, 1, m])
                outputs.append(y * tf.cast(scales[k], y.dtype))
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
                    y = tf.nn.conv2d(branch, self._read(p[key]), 2, "VALID")
                    halves.append(tf.reshape(
                        y, [-1, y.shape[1], y.shape[2], m, c // 2]))
                y = tf.concat(halves, axis=-1)
                y = tf.reshape(y, [-1, y.shape[1], y.shape[2], m * c])
                outputs.append(batch_norm(y, name, "", scales[k]))
                continue
            if tiled is None:
                # M copies of the ReLU, edge-major: every depthwise
                # convolution then has multiplier 1 (TF's multiplier > 1
                # kernels are 1.5-2x slower, mostly in the backward pass).
                tiled = tf.tile(relu, [1, 1, 1, m]) if m > 1 else relu
            size, dilation, separable = _CONV_SPECS[name]
            tag = "1" if separable else ""
            y = _depthwise(tiled, self._read(p[f"depthwise{tag}"]), size,
                           stride, dilation)
            y = grouped_pointwise(y, self._read(p[f"pointwise{tag}"]))
            if separable:
                y = batch_norm(y, name, "1")
                y = _depthwise(tf.nn.relu(y), self._read(p["depthwise2"]), size,
                               1, 1)
                y = grouped_pointwise(y, self._read(p["pointwise2"]))
                y = batch_norm(y, name, "2", scales[k])
            else:
                y = batch_norm(y, name, "", scales[k])
            outputs.append(y)
        if training and slots:
            for v, i in zip(self._stats[j], (0, 1)):
                parts = [updates[slot[:2]][i] for slot in slots]
                v.assign(parts[0] if len(parts) == 1
                         else tf.concat(parts, axis=0))
        if not outputs:
            return None
        return outputs[0] if len(outputs) == 1 else tf.add_n(outputs)

    def _state_terms(self, x, j, scales, training):
        """State `j`'s weighted op outputs, one list per outgoing edge
        (the "split" edge layout; `_state_output` is the batched one)."""
        stride, targets, _ = self._plan[j]
        m, c = len(targets), self.channels
        params = self._params[j]
        slots = self._bn_slots(j)
        stats = {}
        if slots:
            # One piece per batch norm and edge (pooling ops: per state).
            keys, sizes = [], []
            for name, tag, size in slots:
                count = size // c
                keys.extend((name, tag, e) for e in range(count))
                sizes.extend([c] * count)
            mean, var = (tf.split(v.value, sizes) if len(sizes) > 1
                         else [v.value] for v in self._stats[j])
            stats = dict(zip(keys, zip(mean, var)))
        updates = {}

        def batch_norm(y, key, scale=None):
            y, new_mean, new_var = _batch_norm(y, *stats[key], scale,
                                               training)
            updates[key] = (new_mean, new_var)
            return y

        def split(variable, axis):
            value = self._read(variable)
            return tf.split(value, m, axis=axis) if m > 1 else [value]

        terms = [[] for _ in range(m)]
        relu = shifted = None
        for k, name in enumerate(self.primitives):
            if name == "none":
                continue
            if not self._is_per_edge(name, stride):
                if name == "skip_connect":
                    y = x
                else:
                    y = batch_norm(ops_lib.pool3x3(x, name[:3], stride),
                                   (name, "", 0))
                for e in range(m):
                    terms[e].append(y * tf.cast(scales[k][e], y.dtype))
                continue
            if relu is None:
                relu = tf.nn.relu(x)
            p = params[name]
            if name == "skip_connect":
                if shifted is None:
                    shifted = tf.pad(relu, [[0, 0], [0, 1], [0, 1], [0, 0]])
                    shifted = shifted[:, 1:, 1:, :]
                for e, (k1, k2) in enumerate(zip(split(p["kernel_1"], 3),
                                                 split(p["kernel_2"], 3))):
                    y = tf.concat([tf.nn.conv2d(relu, k1, 2, "VALID"),
                                   tf.nn.conv2d(shifted, k2, 2, "VALID")],
                                  axis=-1)
                    terms[e].append(batch_norm(y, (name, "", e),
                                               scales[k][e]))
                continue
            size, dilation, separable = _CONV_SPECS[name]
            tag = "1" if separable else ""
            blocks = [split(p[f"depthwise{tag}"], 2),
                      split(p[f"pointwise{tag}"], 3)]
            if separable:
                blocks += [split(p["depthwise2"], 2),
                           split(p["pointwise2"], 3)]
            for e in range(m):
                y = _depthwise(relu, blocks[0][e], size, stride, dilation)
                y = tf.nn.conv2d(y, blocks[1][e], 1, "VALID")
                if separable:
                    y = batch_norm(y, (name, "1", e))
                    y = _depthwise(tf.nn.relu(y), blocks[2][e], size, 1, 1)
                    y = tf.nn.conv2d(y, blocks[3][e], 1, "VALID")
                    y = batch_norm(y, (name, "2", e), scales[k][e])
                else:
                    y = batch_norm(y, (name, "", e), scales[k][e])
                terms[e].append(y)
        if training and stats:
            for v, i in zip(self._stats[j], (0, 1)):
                parts = [updates[key][i] for key in stats]
                v.assign(parts[0] if len(parts) == 1
                         else tf.concat(parts, axis=0))
        return terms

    def call(self, s0, s1, weights, training=False):
        weights = tf.cast(weights, tf.float32)
        # The preprocessing BNs follow their own policy (float32 unless a
        # global one is set): bring their outputs to this cell's dtype.
        states = [tf.cast(self.preprocess0(s0, training=training),
                          self.compute_dtype),
                  tf.cast(self.preprocess1(s1, training=training),
                          self.compute_dtype)]
        scales = self._edge_scales(weights)
        inputs = [[] for _ in range(self.steps)]
        for j, (stride, targets, _) in enumerate(self._plan):
            if j >= 2:
                states.append(self._node(inputs[j - 2], states[1]))
            if self.edge_layout == "split":
                m = len(targets)
                scales_j = {k: tf.split(v, m) if m > 1 else [v]
                            for k, v in scales[j].items()}
                for i, terms in zip(targets, self._state_terms(
                        states[j], j, scales_j, training)):
                    inputs[i].extend(terms)
                continue
            y = self._state_output(states[j], j, scales[j], training)
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
                      primitives=list(self.primitives),
                      edge_layout=self.edge_layout)
        return config


# -- conversion to and from SearchCell -------------------------------------

def _layout(fused_cell, reference_cell):
    """``[(fused_variable, kind, groups)]`` for every fused variable.

    `groups` lists, per part of the fused variable, the reference variables
    it corresponds to (one, or a pooling op's per-edge statistics, which
    are equal). `kind` is "same" (a one-to-one copy) or a key of `_AXES`,
    the axis along which the parts are concatenated.
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
            layout.append((f, "same", [[r]]))
    for j, (stride, _, edges) in enumerate(fused_cell._plan):
        mixed = [reference_cell.edges[e] for e in edges]
        for k, name in enumerate(fused_cell.primitives):
            if not fused_cell._is_per_edge(name, stride):
                continue
            p = fused_cell._params[j][name]
            ops = [mo.candidates[k] for mo in mixed]
            if name == "skip_connect":
                for key in ("kernel_1", "kernel_2"):
                    layout.append((p[key], "concat_out",
                                   [[getattr(op, key)] for op in ops]))
                continue
            blocks = [("", ops)]
            if _CONV_SPECS[name][2]:
                blocks = [("1", [op.block_1 for op in ops]),
                          ("2", [op.block_2 for op in ops])]
            for tag, convs in blocks:
                layout.append((p[f"depthwise{tag}"], "concat_in",
                               [[op.depthwise_kernel] for op in convs]))
                layout.append((p[f"pointwise{tag}"], "concat_out",
                               [[op.pointwise_kernel] for op in convs]))
        if fused_cell._stats[j] is None:
            continue
        # Groups of reference batch norms, in the order of _bn_slots: a
        # pooling op's per-edge batch norms share one slot.
        groups = []
        for name, tag, _ in fused_cell._bn_slots(j):
            k = fused_cell.primitives.index(name)
            ops = [mo.candidates[k] for mo in mixed]
            if name in ("max_pool_3x3", "avg_pool_3x3"):
                groups.append([[mo.pool_bns[name] for mo in mixed]])
            elif name == "skip_connect":
                groups.append([[op.bn] for op in ops])
            elif tag:
                groups.append([[getattr(op, f"block_{tag}").bn]
                               for op in ops])
            else:
                groups.append([[op.bn] for op in ops])
        bns = [group for slot in groups for group in slot]
        for variable, stat in zip(fused_cell._stats[j],
                                  ("moving_mean", "moving_variance")):
            layout.append((variable, "concat",
                           [[getattr(bn, stat) for bn in group]
                            for group in bns]))
    return layout


# Axis along which the per-edge parts of a fused variable are concatenated:
# "concat_in" for depthwise kernels ([k, k, C, 1] -> [k, k, M * C, 1]),
# "concat_out" for 1x1 kernels ([1, 1, C, D] -> [1, 1, C, M * D]), "concat"
# for statistics ([C] -> [M * C]).
_AXES = {"concat_in": 2, "concat_out": 3, "concat": 0}


def _combine(kind, parts):
    if kind == "same":
        return parts[0]
    return tf.concat(parts, axis=_AXES[kind])


def _split(kind, value, groups):
    if kind == "same":
        return [value]
    axis = _AXES[kind]
    return tf.split(value, [int(g[0].shape[axis]) for g in groups], axis=axis)


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
    # Each group of reference variables maps to one part of a fused
    # variable; the members of a group (a pooling op's per-edge statistics)
    # hold equal values, so the first stands for all.
    return [(f, _combine(kind, [fetch(group[0]) for group in groups]))
            for f, kind, groups in _layout(fused_cell, reference_cell)]


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
    for variable, kind, groups in _layout(fused_cell, reference_cell):
        value = tf.convert_to_tensor(variable.value)
        for group, part in zip(groups, _split(kind, value, groups)):
            for ref in group:
                ref.assign(tf.cast(part, ref.dtype))
