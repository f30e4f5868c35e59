"""Tests for e2rnas_tf.space.search_space: MixedOp, SearchCell and SearchNetwork
(layer checks, the mixed-op maths, alphas, parameter counts, `.keras`
round-trip, argument validation)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_test_util import (
    check_layer,
    count,
    mixed_op_counts,
    search_cell_counts,
    search_network_counts,
)

from e2rnas_tf.space import costs, ops, topology
from e2rnas_tf.space import search_space as ss

PRIMS = ops.PRIMITIVES


def rand(*shape, seed=0, low=-1.0, high=1.0):
    rng = np.random.RandomState(seed)
    return rng.uniform(low, high, size=shape).astype(np.float32)


def softmax(a):
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def call_op(op, x, training):
    if isinstance(op, (ops.Identity, ops.Zero, ops.Pool)):
        return op(x)
    return op(x, training=training)


# ---------------------------------------------------------------------------
# Helpers.


# ---------------------------------------------------------------------------
# MixedOp.


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_layer(stride):
    c, size = 4, 7
    x = rand(2, size, size, c, seed=stride)
    w = softmax(rand(len(PRIMS), seed=5))
    out = size if stride == 1 else 4
    trainable, non_trainable = mixed_op_counts(c, stride, PRIMS)
    check_layer(lambda: ss.MixedOp(c, stride), [x, w],
                expected_output_shape=(2, out, out, c),
                expected_trainable=trainable,
                expected_non_trainable=non_trainable,
                updates_moving_stats=True)


@pytest.fixture(scope="module")
def mixed_stride2():
    c = 4
    x = tf.constant(rand(2, 7, 7, c, seed=9))
    mixed = ss.MixedOp(c, 2)
    mixed(x, tf.ones([len(PRIMS)]) / len(PRIMS))
    return mixed, x


def _reference_op(mixed, k, x, training):
    """The chosen op rebuilt from scratch (weights copied), with a fresh
    non-affine batch norm after pooling."""
    name = mixed.primitives[k]
    op = ops.make_op(name, mixed.channels, mixed.stride, affine=False)
    call_op(op, x, training)
    op.set_weights(mixed.candidates[k].get_weights())
    y = call_op(op, x, training)
    if "pool" in name:
        bn = ops.BatchNorm(affine=False)
        bn.build(y.shape)
        bn.set_weights(mixed.pool_bns[name].get_weights())
        y = bn(y, training=training)
    return y.numpy()


@pytest.mark.parametrize("training", [False, True])
def test_mixed_op_one_hot_is_the_chosen_op(mixed_stride2, training):
    mixed, x = mixed_stride2
    for k, name in enumerate(PRIMS):
        w = tf.one_hot(k, len(PRIMS))
        y = mixed(x, w, training=training).numpy()
        if name == "none":
            np.testing.assert_array_equal(y, np.zeros((2, 4, 4, 4)))
            continue
        # Reference first in training mode too: both see the same batch.
        np.testing.assert_allclose(
            y, _reference_op(mixed, k, x, training), rtol=1e-5, atol=1e-5,
            err_msg=name)


def test_mixed_op_is_the_weighted_sum(mixed_stride2):
    mixed, x = mixed_stride2
    w = rand(len(PRIMS), seed=3, low=0.0)
    expected = sum(w[k] * _reference_op(mixed, k, x, False)
                   for k, name in enumerate(PRIMS) if name != "none")
    np.testing.assert_allclose(mixed(x, w, training=False).numpy(), expected,
                               rtol=1e-5, atol=1e-5)


def test_mixed_op_none_has_zero_gradient(mixed_stride2):
    mixed, x = mixed_stride2
    w = tf.constant(softmax(rand(len(PRIMS), seed=4)))
    target = tf.constant(rand(2, 4, 4, 4, seed=6))
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = tf.reduce_sum(mixed(x, w, training=True) * target)
    grad = tape.gradient(loss, w).numpy()
    assert grad[PRIMS.index("none")] == 0.0
    others = np.delete(grad, PRIMS.index("none"))
    assert np.all(others != 0.0)
    # 'none' is never built: no sub-layer and no weights for it.
    assert mixed.candidates[PRIMS.index("none")] is None


def test_mixed_op_subset_of_primitives():
    prims = ("skip_connect", "none", "avg_pool_3x3")
    mixed = ss.MixedOp(4, 1, prims)
    x = rand(2, 5, 5, 4)
    y = mixed(x, tf.constant([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(y.numpy(), x)
    assert mixed.get_config()["primitives"] == list(prims)


# ---------------------------------------------------------------------------
# SearchCell.

CELL_CASES = {
    # name: (reduction, reduction_prev, s0 shape, s1 shape, output size)
    "normal": (False, False, (2, 7, 7, 6), (2, 7, 7, 8), 7),
    "reduction": (True, False, (2, 7, 7, 6), (2, 7, 7, 8), 4),
    "reduction_prev": (False, True, (2, 9, 9, 6), (2, 5, 5, 8), 5),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_search_cell_layer(case):
    # Two nodes (5 edges) keep this fast; the network tests use four.
    reduction, reduction_prev, s0, s1, out = CELL_CASES[case]
    c, steps = 4, 2
    w = softmax(rand(topology.num_edges(steps), len(PRIMS), seed=1))
    trainable, non_trainable = search_cell_counts(
        c, s0[-1], s1[-1], reduction, PRIMS, steps=steps)
    check_layer(
        lambda: ss.SearchCell(c, reduction, reduction_prev, steps=steps,
                              multiplier=steps),
        [rand(*s0, seed=2), rand(*s1, seed=3), w],
        expected_output_shape=(2, out, out, steps * c),
        expected_trainable=trainable, expected_non_trainable=non_trainable,
        updates_moving_stats=True, graph_modes=(True,))


def test_search_cell_default_shapes_and_counts():
    # Four nodes, reduction after reduction (the last cell of layers=3).
    c = 4
    cell = ss.SearchCell(c, reduction=True, reduction_prev=True)
    s0, s1 = rand(2, 7, 7, 6), rand(2, 4, 4, 16)
    y = cell(s0, s1, softmax(rand(14, 8)), training=True)
    assert y.shape == (2, 2, 2, 16)
    assert (count(cell.trainable_weights), count(cell.non_trainable_weights)) \
        == search_cell_counts(c, 6, 16, True, PRIMS)


def test_search_cell_output_is_concat_of_last_nodes():
    # With only skip_connect and weights 1, node i = sum of its inputs, so
    # every node is a known sum of the two preprocessed inputs p0, p1:
    # n0 = p0 + p1, n1 = p0 + p1 + n0, n2 = ... (doubling).
    cell = ss.SearchCell(2, steps=3, multiplier=2,
                         primitives=("skip_connect",))
    s0, s1 = rand(1, 5, 5, 3, seed=1), rand(1, 5, 5, 3, seed=2)
    y = cell(s0, s1, tf.ones([topology.num_edges(3), 1])).numpy()
    p0 = cell.preprocess0(s0).numpy()
    p1 = cell.preprocess1(s1).numpy()
    n0 = p0 + p1
    n1 = p0 + p1 + n0
    n2 = p0 + p1 + n0 + n1
    np.testing.assert_allclose(y, np.concatenate([n1, n2], -1), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------------------
# SearchNetwork.

# The reference cells: the hand formulas count one MixedOp per edge.
NET_KW = dict(channels=4, num_classes=10, layers=3, cell_impl="reference")
# Pinned: channels=4, layers=3, 10 classes, all 8 primitives, 8x8 input.
PINNED_WEIGHTS = 72854
PINNED_NON_TRAINABLE = 6792


@pytest.fixture(scope="module")
def images():
    return tf.constant(rand(4, 8, 8, 3, seed=0, low=0.0))


@pytest.fixture(scope="module")
def net(images):
    net = ss.SearchNetwork(alpha_seed=0, **NET_KW)
    net(images, training=True)  # moving statistics away from their init
    return net


# Enough ops for every code path of the network (pooling + its BN,
# FactorizedReduce, a convolution, 'none') at a third of the full cost.
FAST_PRIMS = ("none", "max_pool_3x3", "skip_connect", "dil_conv_3x3")


def test_search_network_layer(images):
    weights, non_trainable, arch = search_network_counts(4, 3, 10,
                                                         FAST_PRIMS)
    check_layer(lambda: ss.SearchNetwork(alpha_seed=1, primitives=FAST_PRIMS,
                                         **NET_KW), [images],
                expected_output_shape=(4, 10),
                expected_trainable=weights + arch,
                expected_non_trainable=non_trainable,
                updates_moving_stats=True, graph_modes=(True,))


def test_fused_search_network_layer(images):
    # The default implementation: same trainable parameters as the
    # reference; fewer statistics (a pooling op's batch norm keeps one set
    # per state instead of identical copies per edge), so not pinned here.
    weights, _, arch = search_network_counts(4, 3, 10, FAST_PRIMS)
    check_layer(lambda: ss.SearchNetwork(
                    alpha_seed=1, primitives=FAST_PRIMS, channels=4,
                    num_classes=10, layers=3, cell_impl="fused"), [images],
                expected_output_shape=(4, 10),
                expected_trainable=weights + arch,
                updates_moving_stats=True, graph_modes=(True,))


def test_default_cell_impl_is_fused_and_validated():
    assert ss.SearchNetwork(channels=4, layers=3).cell_impl == "fused"
    with pytest.raises(ValueError, match="cell_impl"):
        ss.SearchNetwork(channels=4, layers=3, cell_impl="fast")


def test_search_network_pinned_parameter_counts(net):
    weights, non_trainable, arch = search_network_counts(4, 3, 10, PRIMS)
    assert count(net.weight_variables) == PINNED_WEIGHTS == weights
    assert count(net.non_trainable_variables) == PINNED_NON_TRAINABLE \
        == non_trainable
    assert count(net.arch_variables) == arch == 2 * 14 * 8
    assert costs.count_params(net.weight_variables) == PINNED_WEIGHTS


def test_alphas(net):
    for alpha in net.arch_variables:
        assert tuple(alpha.shape) == (14, 8)
        assert alpha.dtype == "float32"
        values = alpha.numpy()
        assert 0.5e-3 < values.std() < 1.5e-3
        assert abs(values.mean()) < 0.5e-3
    assert [a.name for a in net.arch_variables] == ["alpha_normal",
                                                    "alpha_reduce"]
    assert not np.array_equal(net.alpha_normal.numpy(),
                              net.alpha_reduce.numpy())
    w_normal, w_reduce = net.op_weights()
    np.testing.assert_allclose(w_normal.numpy(),
                               softmax(net.alpha_normal.numpy()), rtol=1e-6)
    np.testing.assert_allclose(w_reduce.numpy(),
                               softmax(net.alpha_reduce.numpy()), rtol=1e-6)


def test_alpha_seed_is_reproducible():
    a = ss.SearchNetwork(alpha_seed=3, **NET_KW)
    b = ss.SearchNetwork(alpha_seed=3, **NET_KW)
    c = ss.SearchNetwork(alpha_seed=4, **NET_KW)
    np.testing.assert_array_equal(a.alpha_normal.numpy(),
                                  b.alpha_normal.numpy())
    np.testing.assert_array_equal(a.alpha_reduce.numpy(),
                                  b.alpha_reduce.numpy())
    assert not np.array_equal(a.alpha_normal.numpy(), c.alpha_normal.numpy())


def test_arch_and_weight_variables_partition_trainables(net):
    arch = {id(v) for v in net.arch_variables}
    weights = {id(v) for v in net.weight_variables}
    trainable = {id(v) for v in net.trainable_variables}
    assert not arch & weights
    assert arch | weights == trainable
    assert len(net.weight_variables) + 2 == len(net.trainable_variables)


def test_both_alphas_reach_the_logits(net, images):
    base = net(images).numpy()
    for alpha in net.arch_variables:
        old = alpha.numpy()
        try:
            alpha.assign(old + rand(14, 8, seed=8))
            assert not np.allclose(net(images).numpy(), base)
        finally:
            alpha.assign(old)
    np.testing.assert_array_equal(net(images).numpy(), base)


def test_keras_file_round_trip(net, images, tmp_path):
    path = str(tmp_path / "supernet.keras")
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, ss.SearchNetwork)
    np.testing.assert_array_equal(loaded.alpha_normal.numpy(),
                                  net.alpha_normal.numpy())
    np.testing.assert_array_equal(loaded.alpha_reduce.numpy(),
                                  net.alpha_reduce.numpy())
    np.testing.assert_allclose(loaded(images).numpy(), net(images).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert loaded.get_config() == net.get_config()
    assert len(loaded.arch_variables) == 2
    assert count(loaded.weight_variables) == PINNED_WEIGHTS


def test_mixed_precision_keeps_alphas_and_logits_float32():
    policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        net = ss.SearchNetwork(channels=4, num_classes=3, layers=3,
                               primitives=FAST_PRIMS)
        logits = net(tf.constant(rand(2, 8, 8, 3, low=0.0)), training=True)
        assert logits.dtype == tf.float32
        assert net.stem_conv.compute_dtype == "bfloat16"
        for alpha in net.arch_variables:
            assert alpha.dtype == "float32"
            assert tuple(alpha.shape) == (14, len(FAST_PRIMS))
            assert 0.5e-3 < alpha.numpy().std() < 1.5e-3
        assert all(w.dtype == tf.float32 for w in net.op_weights())
        assert np.all(np.isfinite(logits.numpy()))
    finally:
        keras.mixed_precision.set_global_policy(policy)


@pytest.mark.parametrize("size,num_classes", [(8, 2), (9, 10), (16, 7),
                                              (32, 100)])
def test_any_input_size_and_class_count(size, num_classes):
    net = ss.SearchNetwork(channels=4, num_classes=num_classes, layers=3)
    logits = net(tf.constant(rand(2, size, size, 3, low=0.0)))
    assert logits.shape == (2, num_classes)
    assert logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))


def test_primitive_subset_network():
    prims = ("none", "skip_connect", "sep_conv_3x3")
    net = ss.SearchNetwork(channels=4, num_classes=3, layers=3,
                           primitives=prims)
    logits = net(tf.constant(rand(2, 8, 8, 3, low=0.0)))
    assert logits.shape == (2, 3)
    assert tuple(net.alpha_normal.shape) == (14, 3)
    weights, _, arch = search_network_counts(4, 3, 3, prims)
    assert count(net.weight_variables) == weights
    assert count(net.arch_variables) == arch


def test_validation_errors():
    with pytest.raises(ValueError, match="Expected `layers` >= 3. "
                       "Received: layers=2"):
        ss.SearchNetwork(layers=2)
    with pytest.raises(ValueError, match=r"Expected an op name in \['none', "
                       r"'max_pool_3x3'.*Received: op='conv_7x7'"):
        ss.SearchNetwork(channels=4, layers=3,
                         primitives=("sep_conv_3x3", "conv_7x7"))
    with pytest.raises(ValueError, match="distinct primitives"):
        ss.SearchNetwork(channels=4, layers=3,
                         primitives=("sep_conv_3x3", "sep_conv_3x3"))
    with pytest.raises(ValueError, match="at least one primitive"):
        ss.MixedOp(4, 1, ())
    with pytest.raises(ValueError, match="Received: stride=3"):
        ss.MixedOp(4, 3)
    with pytest.raises(ValueError, match="Received: channels=0"):
        ss.SearchNetwork(channels=0)
    with pytest.raises(ValueError, match="Received: num_classes=0"):
        ss.SearchNetwork(num_classes=0)
    with pytest.raises(ValueError, match="Received: multiplier=5, steps=4"):
        ss.SearchCell(4, multiplier=5)
    with pytest.raises(ValueError, match="Received: steps=0"):
        ss.SearchCell(4, steps=0)
    # A reduction_prev cell needs even channels (FactorizedReduce).
    with pytest.raises(ValueError, match="Received: channels=5"):
        ss.SearchCell(5, reduction_prev=True)
    with pytest.raises(ValueError, match="Received: channels=5"):
        ss.MixedOp(5, 2)


def test_numpy_integer_arguments_give_json_configs():
    mixed = ss.MixedOp(np.int64(4), np.int64(2))
    assert json.loads(json.dumps(mixed.get_config()))["stride"] == 2
    net = ss.SearchNetwork(channels=np.int64(4), layers=np.int64(3),
                           alpha_seed=np.int64(0))
    assert json.loads(json.dumps(net.get_config()))["alpha_seed"] == 0
