"""Tests for e2rnas_tf.space.ops: every candidate op as a Keras layer, NumPy
references for the padding/pooling/batch-norm maths, pinned parameter
counts and argument validation."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_test_util import check_layer, count, op_counts

from e2rnas_tf.space import ops

EPS = ops.BN_EPSILON


def rand(*shape, seed=0, low=-1.0, high=1.0):
    rng = np.random.RandomState(seed)
    return rng.uniform(low, high, size=shape).astype(np.float32)


def ceil_half(n):
    return -(-n // 2)


def bn_inference(x):
    """Batch norm with fresh statistics (mean 0, variance 1, no affine)."""
    return (np.asarray(x) / np.sqrt(1.0 + EPS)).astype(np.float32)


# ---------------------------------------------------------------------------
# Parameter counts by hand formula (`layer_test_util.op_counts`).


# Affine counts worked out by hand, to guard the formula itself.
LITERAL_AFFINE = {
    4: {"sep_conv_3x3": 120, "sep_conv_5x5": 248, "dil_conv_3x3": 60,
        "dil_conv_5x5": 124, "skip_connect": 24},
    16: {"sep_conv_3x3": 864, "sep_conv_5x5": 1376, "dil_conv_3x3": 432,
         "dil_conv_5x5": 688, "skip_connect": 288},
    36: {"sep_conv_3x3": 3384, "sep_conv_5x5": 4536, "dil_conv_3x3": 1692,
         "dil_conv_5x5": 2268, "skip_connect": 1368},
}


@pytest.mark.parametrize("channels", [4, 16, 36])
@pytest.mark.parametrize("affine", [True, False])
def test_pinned_op_parameter_counts(channels, affine):
    shape = (1, 5, 5, channels)
    for stride in (1, 2):
        for name in ops.PRIMITIVES:
            op = ops.make_op(name, channels, stride, affine=affine)
            op.build(shape)
            trainable, non_trainable = op_counts(name, channels, stride,
                                                 affine)
            assert count(op.trainable_weights) == trainable, (name, stride)
            assert count(op.non_trainable_weights) == non_trainable
            if affine and stride == 2 and name in LITERAL_AFFINE[channels]:
                assert trainable == LITERAL_AFFINE[channels][name], name
    # The formula in the issue: sep_conv_3x3 = 2 * (9C + C*C + 2C).
    c = channels
    assert op_counts("sep_conv_3x3", c, 1, True)[0] == 2 * (9 * c + c * c
                                                             + 2 * c)


# ---------------------------------------------------------------------------
# Every op through the layer checker, at even and odd sizes.

SIZES = [8, 7, 9]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", [p for p in ops.PRIMITIVES])
def test_every_op_with_layer_checker(name, stride, size):
    c = 4
    x = rand(2, size, size, c, seed=size)
    out = size if stride == 1 else ceil_half(size)
    trainable, non_trainable = op_counts(name, c, stride, affine=True)
    stateless = name == "none" or "pool" in name or (
        name == "skip_connect" and stride == 1)
    check_layer(
        lambda: ops.make_op(name, c, stride, affine=True),
        [x], expected_output_shape=(2, out, out, c),
        expected_trainable=trainable, expected_non_trainable=non_trainable,
        takes_training=not stateless,
        updates_moving_stats=None if stateless else True)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_layer(affine):
    c = 3
    check_layer(lambda: ops.BatchNorm(affine=affine), [rand(4, 5, 5, c)],
                expected_output_shape=(4, 5, 5, c),
                expected_trainable=2 * c if affine else 0,
                expected_non_trainable=2 * c, updates_moving_stats=True)


def test_relu_conv_bn_layer():
    # 1x1 preprocessing, channel change 6 -> 4, and a 3x3 stride-2 variant.
    check_layer(lambda: ops.ReLUConvBN(4, 1, 1, affine=False),
                [rand(2, 7, 7, 6)], expected_output_shape=(2, 7, 7, 4),
                expected_trainable=6 * 4, expected_non_trainable=8,
                updates_moving_stats=True)
    check_layer(lambda: ops.ReLUConvBN(4, 3, 2, affine=True),
                [rand(2, 9, 9, 6)], expected_output_shape=(2, 5, 5, 4),
                expected_trainable=9 * 6 * 4 + 8, expected_non_trainable=8)


def test_factorized_reduce_with_channel_change():
    check_layer(lambda: ops.FactorizedReduce(8, affine=False),
                [rand(2, 7, 7, 6)], expected_output_shape=(2, 4, 4, 8),
                expected_trainable=2 * 6 * 4, expected_non_trainable=16,
                updates_moving_stats=True)


def test_normalize_layer():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)
    x = rand(2, 5, 5, 3, low=0.0)
    layer = check_layer(lambda: ops.Normalize(mean, std), [x],
                        expected_output_shape=(2, 5, 5, 3),
                        expected_trainable=0, expected_non_trainable=0,
                        takes_training=False)
    expected = (x - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------
# NumPy references.


def np_pool(x, stride, kind):
    """PyTorch-style 3x3 pooling with symmetric padding 1; average over the
    real pixels only (count_include_pad=False); max ignores padding."""
    n, h, w, c = x.shape
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = np.zeros((n, oh, ow, c), np.float64)
    for i in range(oh):
        for j in range(ow):
            r0, r1 = max(i * stride - 1, 0), min(i * stride + 2, h)
            c0, c1 = max(j * stride - 1, 0), min(j * stride + 2, w)
            window = x[:, r0:r1, c0:c1, :]
            out[:, i, j, :] = (window.mean(axis=(1, 2)) if kind == "avg"
                               else window.max(axis=(1, 2)))
    return out


@pytest.mark.parametrize("size", [7, 8, 9])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pooling_matches_numpy(kind, stride, size):
    # All-negative input: a max pool that padded with zeros would show it.
    x = (rand(2, size, size + 2, 3, seed=1) if kind == "avg"
         else rand(2, size, size + 2, 3, seed=1, low=-2.0, high=-0.5))
    y = ops.Pool(kind, stride)(x).numpy()
    np.testing.assert_allclose(y, np_pool(x, stride, kind), rtol=1e-5,
                               atol=1e-6)


def test_factorized_reduce_branches_match_numpy():
    for size in (7, 8):
        x = rand(2, size, size, 6, seed=size)
        layer = ops.FactorizedReduce(4, affine=False)
        y = layer(x, training=False).numpy()
        k1 = layer.kernel_1.numpy()[0, 0]
        k2 = layer.kernel_2.numpy()[0, 0]
        r = np.maximum(x, 0.0)
        # Branch 1 reads pixels (2i, 2j); branch 2 reads (2i + 1, 2j + 1),
        # which for an odd size falls off the image on the last row/column.
        shifted = np.pad(r[:, 1:, 1:, :], [[0, 0], [0, 1], [0, 1], [0, 0]])
        b1 = r[:, ::2, ::2, :] @ k1
        b2 = shifted[:, ::2, ::2, :] @ k2
        expected = bn_inference(np.concatenate([b1, b2], axis=-1))
        assert y.shape == (2, ceil_half(size), ceil_half(size), 4)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        if size == 7:
            np.testing.assert_allclose(y[:, -1, :, 2:], 0.0, atol=1e-7)


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("size", [7, 8, 9])
def test_dil_conv_stride2_equals_dense_then_subsample(kernel_size, size):
    c = 3
    x = rand(2, size, size, c, seed=kernel_size * size)
    layer = ops.DilConv(c, kernel_size, stride=2, dilation=2, affine=False)
    y = layer(x, training=False).numpy()
    pad = 2 * (kernel_size // 2)
    padded = tf.pad(tf.nn.relu(x), [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    dense = tf.nn.depthwise_conv2d(padded, layer.depthwise_kernel, [1] * 4,
                                   "VALID", dilations=[2, 2])
    sub = dense[:, ::2, ::2, :]
    expected = bn_inference(
        tf.nn.conv2d(sub, layer.pointwise_kernel, 1, "VALID").numpy())
    assert y.shape == (2, ceil_half(size), ceil_half(size), c)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dil_conv_stride1_is_centred():
    # A kernel with a single 1 at its centre must reproduce relu(x) (so the
    # padding is symmetric), then the identity pointwise conv.
    c = 2
    x = rand(1, 7, 7, c, seed=3)
    layer = ops.DilConv(c, 3, stride=1, dilation=2, affine=False)
    layer(x)
    dw = np.zeros((3, 3, c, 1), np.float32)
    dw[1, 1] = 1.0
    layer.depthwise_kernel.assign(dw)
    layer.pointwise_kernel.assign(np.eye(c, dtype=np.float32)[None, None])
    np.testing.assert_allclose(layer(x).numpy(),
                               bn_inference(np.maximum(x, 0)), atol=1e-6)


def test_batch_norm_training_matches_numpy():
    x = rand(4, 3, 5, 2, seed=7, low=-3.0, high=5.0)
    bn = ops.BatchNorm(affine=True)
    bn.build(x.shape)
    gamma = np.array([1.5, -0.5], np.float32)
    beta = np.array([0.2, 0.3], np.float32)
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    bn.moving_mean.assign([0.1, -0.2])
    bn.moving_variance.assign([2.0, 0.5])
    y = bn(x, training=True).numpy()

    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 1, 2))
    var = x64.var(axis=(0, 1, 2))  # biased: used to normalise
    n = x.size // x.shape[-1]
    expected = (x64 - mean) / np.sqrt(var + EPS) * gamma + beta
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # Moving averages with momentum 0.9 and the unbiased variance.
    np.testing.assert_allclose(bn.moving_mean.numpy(),
                               0.9 * np.array([0.1, -0.2]) + 0.1 * mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        bn.moving_variance.numpy(),
        0.9 * np.array([2.0, 0.5]) + 0.1 * var * n / (n - 1), rtol=1e-5)
    # The same update inside a graph.
    graph_bn = ops.BatchNorm(affine=True)
    graph_bn.build(x.shape)
    graph_bn.set_weights([gamma, beta, np.array([0.1, -0.2]),
                          np.array([2.0, 0.5])])
    tf.function(lambda t: graph_bn(t, training=True), autograph=False)(x)
    np.testing.assert_allclose(graph_bn.moving_mean.numpy(),
                               bn.moving_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(graph_bn.moving_variance.numpy(),
                               bn.moving_variance.numpy(), rtol=1e-6)
    # Inference uses the moving statistics.
    y = bn(x, training=False).numpy()
    mm, mv = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    np.testing.assert_allclose(y, (x64 - mm) / np.sqrt(mv + EPS) * gamma
                               + beta, rtol=1e-4, atol=1e-5)


def test_batch_norm_mixed_precision_keeps_float32_statistics():
    policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        bn = ops.BatchNorm(affine=True)
        y = bn(tf.constant(rand(2, 4, 4, 3)), training=True)
        assert y.dtype == tf.bfloat16
        assert all(v.dtype == "float32" for v in bn.weights)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def test_sep_conv_is_two_dil1_blocks():
    c = 3
    x = rand(2, 7, 7, c, seed=11)
    sep = ops.SepConv(c, 3, stride=2, affine=False)
    y = sep(x, training=False).numpy()

    def block(inp, layer, stride):
        dw = tf.nn.depthwise_conv2d(
            tf.pad(tf.nn.relu(inp), [[0, 0], [1, 1], [1, 1], [0, 0]]),
            layer.depthwise_kernel, [1, stride, stride, 1], "VALID")
        return bn_inference(
            tf.nn.conv2d(dw, layer.pointwise_kernel, 1, "VALID").numpy())

    expected = block(block(x, sep.block_1, 2), sep.block_2, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_zero_and_identity():
    x = rand(2, 7, 7, 3)
    np.testing.assert_array_equal(ops.Zero(2)(x).numpy(),
                                  np.zeros((2, 4, 4, 3)))
    np.testing.assert_array_equal(ops.make_op("skip_connect", 3, 1)(x), x)


# ---------------------------------------------------------------------------
# Argument validation.


def test_make_op_validation():
    with pytest.raises(ValueError, match=r"Expected an op name in .*"
                       r"'sep_conv_3x3'.*Received: op='conv_7x7'"):
        ops.make_op("conv_7x7", 4, 1)
    with pytest.raises(ValueError, match="Expected `stride` to be 1 or 2. "
                       "Received: stride=3"):
        ops.make_op("sep_conv_3x3", 4, 3)
    with pytest.raises(ValueError, match="Received: channels=0"):
        ops.make_op("sep_conv_3x3", 0, 1)
    with pytest.raises(ValueError, match="Received: channels=True"):
        ops.make_op("dil_conv_3x3", True, 1)


def test_layer_validation():
    with pytest.raises(ValueError, match="even for FactorizedReduce. "
                       "Received: channels=5"):
        ops.FactorizedReduce(5)
    with pytest.raises(ValueError, match="odd `kernel_size`"):
        ops.DilConv(4, 4)
    with pytest.raises(ValueError, match="Received: dilation=3"):
        ops.DilConv(4, 3, dilation=3)
    with pytest.raises(ValueError, match="Received: stride=3"):
        ops.SepConv(4, 3, stride=3)
    with pytest.raises(ValueError, match="odd `kernel_size`"):
        ops.SepConv(4, 2)
    with pytest.raises(ValueError, match="Received: kind='min'"):
        ops.Pool("min")
    with pytest.raises(ValueError, match="Received: stride=0"):
        ops.Zero(0)
    with pytest.raises(ValueError, match="Received: momentum=1.0"):
        ops.BatchNorm(momentum=1.0)
    with pytest.raises(ValueError, match="Received: epsilon=0"):
        ops.BatchNorm(epsilon=0)
    with pytest.raises(ValueError, match="Expected positive `std`"):
        ops.Normalize(std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3 values"):
        ops.Normalize(mean=(0.5, 0.5))


def test_numpy_integer_arguments_give_json_configs():
    # Sizes often come from NumPy (shapes, configs); configs must still
    # serialise, or a model holding the op cannot be saved.
    for name in ops.PRIMITIVES:
        op = ops.make_op(name, np.int64(4), np.int64(2))
        config = json.loads(json.dumps(op.get_config()))
        assert config.get("stride", 2) == 2
    assert json.dumps(ops.DilConv(4, np.int32(3), dilation=np.int64(2))
                      .get_config())
    with pytest.raises(ValueError, match="Received: stride=True"):
        ops.Pool("max", stride=True)
