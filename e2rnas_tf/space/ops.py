"""Candidate operations of the DARTS / E2RNAS search space, as Keras layers.

Every op is channels-last (NHWC) and keeps the channel count. Spatial padding
follows the original PyTorch DARTS code exactly (symmetric ``k // 2`` padding,
average pooling that does not count padded pixels), so that a stride-2 op
looks at the same window of the input as it does there; TensorFlow's ``SAME``
padding would shift stride-2 windows by one pixel. Output size of a stride-2
op is ``ceil(H / 2)`` for any ``H``, so inputs need not be powers of two.

Reference:
    Liu, Simonyan, Yang. DARTS: Differentiable Architecture Search.
    https://arxiv.org/abs/1806.09055
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1 expressed the Keras way.
BN_EPSILON = 1e-5

_PACKAGE = "e2rnas_tf"


def _check_positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"Expected `{name}` to be a positive integer. Received: {name}={value!r}"
        )


def _check_stride(stride):
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"Expected `stride` to be 1 or 2. Received: stride={stride!r}")
    return int(stride)


def _pad_hw(x, pad):
    if pad == 0:
        return x
    return tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])


def _subsample(x, stride):
    return x if stride == 1 else x[:, ::stride, ::stride, :]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BatchNorm(keras.layers.Layer):
    """Batch normalisation over the channel axis with DARTS' defaults.

    One fused kernel (``tf.nn.fused_batch_norm``) per call instead of the
    handful of small ops that ``keras.layers.BatchNormalization`` emits: the
    search network holds hundreds of these, so graph size (and with it
    tracing and graph-optimisation time) matters more than usual.

    Args:
        affine: whether to learn a scale and offset. The search network uses
            ``affine=False``, the derived (retrained) network ``affine=True``.
        momentum: moving-average momentum of the inference statistics.
        epsilon: added to the variance for numerical stability.

    Call arguments:
        inputs: a 4-D NHWC tensor.
        training: use batch statistics (and update the moving ones) if true.
    """

    def __init__(self, affine=True, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"Expected `momentum` in [0, 1). Received: momentum={momentum!r}"
            )
        if epsilon <= 0:
            raise ValueError(f"Expected `epsilon` > 0. Received: epsilon={epsilon!r}")
        self.affine = bool(affine)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        # Scale, offset and statistics stay float32 (autocast=False) under
        # mixed precision: the fused kernel wants them so, and BN statistics
        # in bfloat16/float16 lose too much.
        if self.affine:
            self.gamma = self.add_weight(
                shape=(channels,), initializer="ones", name="gamma",
                autocast=False)
            self.beta = self.add_weight(
                shape=(channels,), initializer="zeros", name="beta",
                autocast=False)
        self.moving_mean = self.add_weight(
            shape=(channels,), initializer="zeros", name="moving_mean",
            trainable=False, autocast=False)
        self.moving_variance = self.add_weight(
            shape=(channels,), initializer="ones", name="moving_variance",
            trainable=False, autocast=False)

    def call(self, inputs, training=False):
        channels = inputs.shape[-1]
        # Statistics and parameters stay float32 under mixed precision.
        if self.affine:
            scale, offset = self.gamma.value, self.beta.value
        else:
            scale = tf.ones([channels], tf.float32)
            offset = tf.zeros([channels], tf.float32)
        scale = tf.cast(scale, tf.float32)
        offset = tf.cast(offset, tf.float32)
        if training:
            # With exponential_avg_factor the kernel returns the updated
            # moving statistics itself (with the unbiased batch variance, as
            # PyTorch uses), which keeps the graph small.
            y, new_mean, new_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=inputs, scale=scale, offset=offset,
                mean=self.moving_mean.value, variance=self.moving_variance.value,
                epsilon=self.epsilon, exponential_avg_factor=1.0 - self.momentum,
                data_format="NHWC", is_training=True)
            self.moving_mean.assign(new_mean)
            self.moving_variance.assign(new_var)
            return y
        y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=scale, offset=offset,
            mean=self.moving_mean.value, variance=self.moving_variance.value,
            epsilon=self.epsilon, data_format="NHWC", is_training=False)
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(affine=self.affine, momentum=self.momentum,
                      epsilon=self.epsilon)
        return config


class _ConvKernels(keras.layers.Layer):
    """Shared plumbing: kernel creation with He-normal init (fan-in mode,
    Keras' `HeNormal`)."""

    def _kernel(self, shape, name):
        return self.add_weight(
            shape=shape, name=name,
            initializer=keras.initializers.HeNormal(),
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Zero(keras.layers.Layer):
    """The ``none`` op: zeros, subsampled when ``stride`` is 2.

    Args:
        stride: 1 or 2.
    """

    def __init__(self, stride=1, **kwargs):
        super().__init__(**kwargs)
        self.stride = _check_stride(stride)

    def call(self, inputs):
        return tf.zeros_like(_subsample(inputs, self.stride))

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.stride, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(stride=self.stride)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Identity(keras.layers.Layer):
    """The stride-1 ``skip_connect`` op."""

    def call(self, inputs):
        return tf.identity(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ReLUConvBN(_ConvKernels):
    """ReLU, ``k x k`` convolution (no bias), batch norm.

    Args:
        channels: output channels.
        kernel_size: odd kernel size; padding is ``kernel_size // 2``.
        stride: 1 or 2.
        affine: learn the batch norm's scale and offset.
    """

    def __init__(self, channels, kernel_size=1, stride=1, affine=True, **kwargs):
        super().__init__(**kwargs)
        _check_positive_int("channels", channels)
        _check_positive_int("kernel_size", kernel_size)
        self.channels = int(channels)
        self.kernel_size = int(kernel_size)
        self.stride = _check_stride(stride)
        self.affine = bool(affine)
        self.bn = BatchNorm(affine=affine, name="bn")

    def build(self, input_shape):
        self.kernel = self._kernel(
            (self.kernel_size, self.kernel_size, int(input_shape[-1]),
             self.channels), "kernel")
        out = list(input_shape[:-1]) + [self.channels]
        self.bn.build(out)

    def call(self, inputs, training=False):
        x = tf.nn.relu(inputs)
        if self.stride == 1:
            x = tf.nn.conv2d(x, self.kernel, 1, "SAME")
        else:
            x = tf.nn.conv2d(_pad_hw(x, self.kernel_size // 2), self.kernel,
                             self.stride, "VALID")
        return self.bn(x, training=training)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.stride, self.channels)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, kernel_size=self.kernel_size,
                      stride=self.stride, affine=self.affine)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FactorizedReduce(_ConvKernels):
    """Halves the resolution without losing pixels: two offset 1x1 stride-2
    convolutions, each producing half the channels, concatenated, then BN.

    Used as ``skip_connect`` at stride 2 and to preprocess the output of a
    reduction cell. For an odd input size the shifted branch is zero-padded
    at the bottom/right so that both branches give ``ceil(H / 2)`` rows.

    Args:
        channels: output channels, even.
        affine: learn the batch norm's scale and offset.
    """

    def __init__(self, channels, affine=True, **kwargs):
        super().__init__(**kwargs)
        _check_positive_int("channels", channels)
        if channels % 2:
            raise ValueError(
                "Expected `channels` to be even for FactorizedReduce. "
                f"Received: channels={channels}")
        self.channels = int(channels)
        self.affine = bool(affine)
        self.bn = BatchNorm(affine=affine, name="bn")

    def build(self, input_shape):
        c_in = int(input_shape[-1])
        self.kernel_1 = self._kernel((1, 1, c_in, self.channels // 2), "kernel_1")
        self.kernel_2 = self._kernel((1, 1, c_in, self.channels // 2), "kernel_2")
        self.bn.build(list(input_shape[:-1]) + [self.channels])

    def call(self, inputs, training=False):
        x = tf.nn.relu(inputs)
        shifted = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])[:, 1:, 1:, :]
        y = tf.concat([
            tf.nn.conv2d(x, self.kernel_1, 2, "VALID"),
            tf.nn.conv2d(shifted, self.kernel_2, 2, "VALID"),
        ], axis=-1)
        return self.bn(y, training=training)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, 2, self.channels)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, affine=self.affine)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Pool(keras.layers.Layer):
    """3x3 max or average pooling, padding 1, stride 1 or 2.

    Average pooling excludes padded pixels from the count (PyTorch's
    ``count_include_pad=False``), as DARTS does.

    Args:
        kind: ``"max"`` or ``"avg"``.
        stride: 1 or 2.
    """

    def __init__(self, kind, stride=1, **kwargs):
        super().__init__(**kwargs)
        if kind not in ("max", "avg"):
            raise ValueError(f"Expected `kind` 'max' or 'avg'. Received: kind={kind!r}")
        self.kind = kind
        self.stride = _check_stride(stride)

    def call(self, inputs):
        return pool3x3(inputs, self.kind, self.stride)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.stride, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(kind=self.kind, stride=self.stride)
        return config


def pool3x3(inputs, kind, stride):
    """3x3 max/avg pooling with DARTS' padding 1 (see `Pool`)."""
    if stride == 1:
        # Stride-1 SAME padding is symmetric and TF's average pooling
        # already ignores padded pixels.
        pool = tf.nn.max_pool2d if kind == "max" else tf.nn.avg_pool2d
        return pool(inputs, 3, 1, "SAME")
    if kind == "max":
        # Pad with the lowest value (what padding means for a max) rather
        # than use explicit pooling padding, which XLA does not support.
        padded = tf.pad(inputs, [[0, 0], [1, 1], [1, 1], [0, 0]],
                        constant_values=inputs.dtype.min)
        return tf.nn.max_pool2d(padded, 3, 2, "VALID")
    # Sum over the padded window, divided by the number of real pixels,
    # which depends only on the (static) spatial size.
    height, width = inputs.shape[1], inputs.shape[2]
    x = tf.nn.avg_pool2d(_pad_hw(inputs, 1), 3, stride, "VALID")
    scale = _avg_pool_scale(height, width)
    return x * tf.constant(scale, dtype=x.dtype)


def _count_valid(size):
    """Number of real pixels in each stride-2 window along one axis."""
    out = (size + 1) // 2
    counts = np.full(out, 3.0)
    counts[0] -= 1.0  # window centred on pixel 0 reaches into the padding
    if 2 * (out - 1) + 1 >= size:
        counts[-1] -= 1.0
    return counts


def _avg_pool_scale(height, width):
    rows, cols = _count_valid(height), _count_valid(width)
    return (9.0 / np.outer(rows, cols))[None, :, :, None].astype(np.float32)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DilConv(_ConvKernels):
    """ReLU, depthwise ``k x k`` convolution with dilation, 1x1 conv, BN.

    TensorFlow has no kernel for a dilated convolution with stride 2; since
    a dilation-2 stride-2 convolution only reads every other pixel, it equals
    an undilated stride-1 convolution of the padded input subsampled by 2,
    which is both exact and four times cheaper than subsampling afterwards.

    Args:
        channels: input and output channels.
        kernel_size: odd depthwise kernel size.
        stride: 1 or 2.
        dilation: 1 or 2.
        affine: learn the batch norm's scale and offset.
    """

    def __init__(self, channels, kernel_size, stride=1, dilation=2,
                 affine=True, **kwargs):
        super().__init__(**kwargs)
        _check_positive_int("channels", channels)
        _check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"Expected an odd `kernel_size`. Received: kernel_size={kernel_size}")
        stride = _check_stride(stride)
        if isinstance(dilation, bool) or dilation not in (1, 2):
            raise ValueError(
                f"Expected `dilation` to be 1 or 2. Received: dilation={dilation!r}")
        self.channels = int(channels)
        self.kernel_size = int(kernel_size)
        self.stride = stride
        self.dilation = int(dilation)
        self.affine = bool(affine)
        self.bn = BatchNorm(affine=affine, name="bn")

    def build(self, input_shape):
        c_in = int(input_shape[-1])
        k = self.kernel_size
        self.depthwise_kernel = self._kernel((k, k, c_in, 1), "depthwise_kernel")
        self.pointwise_kernel = self._kernel((1, 1, c_in, self.channels),
                                             "pointwise_kernel")
        self.bn.build(list(input_shape[:-1]) + [self.channels])

    def call(self, inputs, training=False):
        return self.bn(self._conv(inputs), training=training)

    def _conv(self, inputs):
        x = tf.nn.relu(inputs)
        pad = self.dilation * (self.kernel_size // 2)
        if self.stride == 1:
            x = tf.nn.depthwise_conv2d(
                x, self.depthwise_kernel, [1, 1, 1, 1], "SAME",
                dilations=[self.dilation, self.dilation])
        elif self.dilation == 1:
            x = tf.nn.depthwise_conv2d(
                x, self.depthwise_kernel, [1, 2, 2, 1],
                [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        else:
            x = _pad_hw(x, pad)[:, ::2, ::2, :]
            x = tf.nn.depthwise_conv2d(
                x, self.depthwise_kernel, [1, 1, 1, 1], "VALID")
        return tf.nn.conv2d(x, self.pointwise_kernel, 1, "VALID")

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.stride, self.channels)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, kernel_size=self.kernel_size,
                      stride=self.stride, dilation=self.dilation,
                      affine=self.affine)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SepConv(keras.layers.Layer):
    """Two stacked ReLU-depthwise-pointwise-BN blocks; stride in the first.

    Args:
        channels: input and output channels.
        kernel_size: odd depthwise kernel size.
        stride: 1 or 2.
        affine: learn the batch norms' scale and offset.
    """

    def __init__(self, channels, kernel_size, stride=1, affine=True, **kwargs):
        super().__init__(**kwargs)
        _check_positive_int("channels", channels)
        _check_positive_int("kernel_size", kernel_size)
        # Plain Python numbers, so that get_config is JSON-serialisable.
        self.channels = int(channels)
        self.kernel_size = int(kernel_size)
        self.stride = _check_stride(stride)
        self.affine = bool(affine)
        self.block_1 = DilConv(channels, kernel_size, stride, 1, affine,
                               name="block_1")
        self.block_2 = DilConv(channels, kernel_size, 1, 1, affine,
                               name="block_2")

    def build(self, input_shape):
        self.block_1.build(input_shape)
        self.block_2.build(self.block_1.compute_output_shape(input_shape))

    def call(self, inputs, training=False):
        x = self.block_1(inputs, training=training)
        return self.block_2(x, training=training)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.stride, self.channels)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, kernel_size=self.kernel_size,
                      stride=self.stride, affine=self.affine)
        return config


def _strided_shape(input_shape, stride, channels):
    def down(n):
        return None if n is None else (n + stride - 1) // stride
    return (input_shape[0], down(input_shape[1]), down(input_shape[2]), channels)




def _pool_op(kind):
    def make(channels, stride, affine, name):
        del channels, affine
        return Pool(kind, stride, name=name)
    return make


def _skip(channels, stride, affine, name):
    if stride == 1:
        return Identity(name=name)
    return FactorizedReduce(channels, affine, name=name)


OPS = {
    "none": lambda c, s, a, name: Zero(s, name=name),
    "max_pool_3x3": _pool_op("max"),
    "avg_pool_3x3": _pool_op("avg"),
    "skip_connect": _skip,
    "sep_conv_3x3": lambda c, s, a, name: SepConv(c, 3, s, a, name=name),
    "sep_conv_5x5": lambda c, s, a, name: SepConv(c, 5, s, a, name=name),
    "dil_conv_3x3": lambda c, s, a, name: DilConv(c, 3, s, 2, a, name=name),
    "dil_conv_5x5": lambda c, s, a, name: DilConv(c, 5, s, 2, a, name=name),
}
assert tuple(OPS) == PRIMITIVES


def check_primitive(name):
    """Raises a ValueError naming the valid ops if ``name`` is not one."""
    if name not in OPS:
        raise ValueError(
            f"Expected an op name in {list(OPS)}. Received: op={name!r}")


def check_primitives(primitives):
    """Validates a candidate-op list (known, distinct, at least one).

    Returns:
        The names as a tuple.
    """
    primitives = tuple(primitives)
    if not primitives:
        raise ValueError(
            "Expected at least one primitive. Received: primitives=()")
    for name in primitives:
        check_primitive(name)
    if len(set(primitives)) != len(primitives):
        raise ValueError(
            f"Expected distinct primitives. Received: primitives={primitives}")
    return primitives


def check_cell_args(channels, steps, multiplier):
    """Validates the shape arguments shared by every cell kind.

    Returns:
        ``(channels, steps, multiplier)`` as Python ints.
    """
    _check_positive_int("channels", channels)
    _check_positive_int("steps", steps)
    _check_positive_int("multiplier", multiplier)
    if multiplier > steps:
        raise ValueError(
            "Expected `multiplier` <= `steps`. "
            f"Received: multiplier={multiplier}, steps={steps}")
    return int(channels), int(steps), int(multiplier)


def make_op(name, channels, stride, affine=True, layer_name=None):
    """Builds the candidate op ``name`` as a Keras layer.

    Args:
        name: one of `PRIMITIVES`.
        channels: input and output channels.
        stride: 1 or 2.
        affine: batch norm with learned scale and offset (False in search).
        layer_name: the Keras layer name.

    Returns:
        A `keras.layers.Layer` mapping ``[N, H, W, C]`` to
        ``[N, ceil(H / stride), ceil(W / stride), C]``.
    """
    check_primitive(name)
    _check_positive_int("channels", channels)
    _check_stride(stride)
    return OPS[name](channels, stride, affine, layer_name or name)


def cell_preprocess(channels, reduction_prev, affine, **kwargs):
    """The two input layers of a DARTS cell: ``(preprocess0, preprocess1)``.

    ``s0`` is brought to ``channels`` by a FactorizedReduce when the
    previous cell halved the resolution (``s0`` is then twice as large as
    ``s1``), else by a ReLU-1x1 conv-BN; ``s1`` always by a ReLU-1x1
    conv-BN.

    Args:
        channels: channels of the cell's nodes.
        reduction_prev: whether the previous cell was a reduction cell.
        affine: batch norms with scale and offset (False in the supernet).
        **kwargs: passed to both layers (e.g. ``dtype``).
    """
    if reduction_prev:
        pre0 = FactorizedReduce(channels, affine=affine, name="preprocess0",
                                **kwargs)
    else:
        pre0 = ReLUConvBN(channels, 1, 1, affine=affine, name="preprocess0",
                          **kwargs)
    pre1 = ReLUConvBN(channels, 1, 1, affine=affine, name="preprocess1",
                      **kwargs)
    return pre0, pre1


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Normalize(keras.layers.Layer):
    """Per-channel ``(x - mean) / std`` at the model's input.

    Kept inside the model so that attacks work in [0, 1] pixel space and an
    exported model accepts raw images.

    Args:
        mean: three floats, in [0, 1] pixel units.
        std: three positive floats.
    """

    def __init__(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kwargs):
        super().__init__(**kwargs)
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(
                "Expected 3 values each for `mean` and `std`. "
                f"Received: mean={mean}, std={std}")
        if min(std) <= 0:
            raise ValueError(f"Expected positive `std`. Received: std={std}")
        self.mean = mean
        self.std = std

    def call(self, inputs):
        mean = tf.constant(self.mean, inputs.dtype)
        inv_std = tf.constant([1.0 / s for s in self.std], inputs.dtype)
        return (inputs - mean) * inv_std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mean=list(self.mean), std=list(self.std))
        return config
