"""Tests for e2rnas_tf.space.costs against hand-computed counts."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf.search import resources
from e2rnas_tf.space import costs, ops, search_space


def _out(size, stride):
    return -(-size // stride)


def test_conv2d_same_and_valid():
    conv = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)
    assert costs.count_macs(conv, (8, 8, 3)) == 8 * 8 * 3 * 3 * 3 * 16
    # VALID, stride 2, non-square kernel: 9x9 -> 3x4 outputs.
    conv = keras.layers.Conv2D(5, (3, 2), strides=2, padding="valid")
    assert costs.count_macs(conv, (7, 9, 4)) == 3 * 4 * 3 * 2 * 4 * 5


def test_depthwise_stride_and_dilation():
    kernel = tf.constant(np.ones((3, 3, 6, 2), np.float32))

    def strided(x):
        return tf.nn.depthwise_conv2d(x, kernel, [1, 2, 2, 1], "SAME")

    def dilated(x):
        return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID",
                                      dilations=[2, 2])

    assert costs.count_macs(strided, (9, 9, 6)) == 5 * 5 * 9 * 6 * 2
    # Dilation 2 widens the 3x3 window to 5x5: 9 - 4 = 5 outputs per axis,
    # each still 9 multiply-adds per channel.
    assert costs.count_macs(dilated, (9, 9, 6)) == 5 * 5 * 9 * 6 * 2


def test_dense_matmul_batch_matmul_einsum():
    assert costs.count_macs(keras.layers.Dense(10), (7,)) == 7 * 10
    a = tf.constant(np.ones((5, 3), np.float32))
    # [1, 5]^T-free: x [1, 5] transposed -> [5, 1]; a^T [3, 5] @ x^T [5, 1].
    assert costs.count_macs(
        lambda x: tf.matmul(a, x, transpose_a=True, transpose_b=True),
        (5,)) == 3 * 5 * 1
    b = tf.constant(np.ones((4, 6), np.float32))
    assert costs.count_macs(lambda x: tf.matmul(x, b), (2, 3, 4)) \
        == 2 * 3 * 4 * 6
    assert costs.count_macs(lambda x: tf.einsum("nhc,cd->nhd", x, b),
                            (3, 4)) == 3 * 4 * 6


def test_uncounted_ops_are_free():
    def fn(x):
        x = tf.nn.relu(x) + 1.0
        x = tf.nn.max_pool2d(x, 3, 2, "SAME")
        return tf.reduce_mean(tf.concat([x, x], -1))

    assert costs.count_macs(fn, (8, 8, 3)) == 0
    assert costs.count_macs(ops.BatchNorm(), (8, 8, 3)) == 0


def test_nested_function_is_rejected():
    inner = tf.function(lambda x: tf.nn.relu(x))

    with pytest.raises(ValueError, match="flat graph"):
        costs.count_macs(lambda x: inner(x), (4,))


def test_bad_input_shape():
    with pytest.raises(ValueError, match="positive sizes"):
        costs.count_macs(lambda x: x, (0, 3))


def _op_macs_by_hand(name, c, stride, size):
    """Multiply-adds of a DARTS op from its definition."""
    out = _out(size, stride) ** 2
    if name in ("none", "max_pool_3x3", "avg_pool_3x3"):
        return 0
    if name == "skip_connect":
        return 0 if stride == 1 else out * c * c  # two 1x1 halves
    k = int(name[-1])
    block_1 = out * k * k * c + out * c * c
    if name.startswith("dil_conv"):
        return block_1
    return block_1 + out * k * k * c + out * c * c  # sep_conv: 2 blocks


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_search_space_ops(stride, size):
    c = 6
    for name in ops.PRIMITIVES:
        op = ops.make_op(name, c, stride, affine=False)
        assert costs.count_macs(op, (size, size, c)) \
            == _op_macs_by_hand(name, c, stride, size), name


def test_count_params():
    dense = keras.layers.Dense(10)
    dense.build((None, 4))
    assert costs.count_params(dense) == 4 * 10 + 10
    bn = ops.BatchNorm(affine=True)
    bn.build((None, 2, 2, 5))
    # gamma + beta; the moving statistics are not parameters.
    assert costs.count_params(bn) == 10
    bn = ops.BatchNorm(affine=False)
    bn.build((None, 2, 2, 5))
    assert costs.count_params(bn) == 0
    # A variable list is counted as given (non-trainable ones included).
    assert costs.count_params(bn.weights) == 10
    assert costs.count_params([tf.zeros([2, 3]), tf.zeros([4])]) == 10
    assert costs.count_params([]) == 0
    sep = ops.make_op("sep_conv_3x3", 8, 1, affine=True)
    sep.build((None, 4, 4, 8))
    assert costs.count_params(sep) == 2 * (9 * 8 + 8 * 8 + 2 * 8)
    with pytest.raises(ValueError, match="built"):
        costs.count_params(keras.layers.Dense(3))


def test_search_network_matches_resource_table():
    # The supernet computes every candidate op on every edge, so its
    # multiply-adds are the flops table's constant plus all its entries:
    # this ties the table's channel schedule to SearchNetwork's.
    for layers, size in ((3, 8), (5, 7)):
        # Reference cells compute every op on every edge, as the table
        # counts them (the fused cell shares work between edges).
        net = search_space.SearchNetwork(channels=4, num_classes=10,
                                         layers=layers,
                                         cell_impl="reference")
        table = resources.measured_table(
            "flops", channels=4, layers=layers, num_classes=10,
            image_size=size)
        total = (np.float64(table.const) + table.normal.astype(np.float64).sum()
                 + table.reduce.astype(np.float64).sum()) * 1e6
        assert costs.count_macs(net, (size, size, 3)) \
            == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("size", [7, 8])
def test_dilated_conv_same_padding(size):
    # TensorFlow implements these with space-to-batch, padding odd sizes.
    kernel = tf.constant(np.ones((3, 3, 4, 5), np.float32))
    dw = tf.constant(np.ones((3, 3, 4, 1), np.float32))
    assert costs.count_macs(
        lambda x: tf.nn.conv2d(x, kernel, 1, "SAME", dilations=2),
        (size, size, 4)) == size * size * 9 * 4 * 5
    assert costs.count_macs(
        lambda x: tf.nn.depthwise_conv2d(x, dw, [1, 1, 1, 1], "SAME",
                                         dilations=[2, 2]),
        (size, size, 4)) == size * size * 9 * 4
    conv = keras.layers.Conv2D(5, 3, dilation_rate=2, padding="same")
    assert costs.count_macs(conv, (size, size, 4)) == size * size * 9 * 4 * 5
