"""Parity of e2rnas_tf.space.fused_cell.FusedSearchCell with search_space.SearchCell.

The reference cell is the independent oracle: weights are copied into the
fused cell and outputs, moving statistics and every gradient must agree.
"""


import keras
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf.space import costs, fused_cell, ops, search_space, topology

C = 4
BATCH = 3
ATOL = 2e-5
CONVS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def _inputs(reduction_prev, size, seed):
    # s0 has the previous-previous cell's resolution (twice as large after
    # a reduction) and another channel count than s1, as in the network.
    s0_size = 2 * size - 1 if reduction_prev else size
    s0 = tf.random.stateless_normal([BATCH, s0_size, s0_size, 5], [seed, 0])
    s1 = tf.random.stateless_normal([BATCH, size, size, 6], [seed, 1])
    return s0, s1


def _pair(reduction, reduction_prev, primitives=ops.PRIMITIVES, size=7,
          steps=4, multiplier=4, edge_layout="batched"):
    """A built reference cell and a fused cell holding the same weights."""
    kwargs = dict(reduction=reduction, reduction_prev=reduction_prev,
                  steps=steps, multiplier=multiplier, primitives=primitives)
    ref = search_space.SearchCell(C, **kwargs)
    fused = fused_cell.FusedSearchCell(C, edge_layout=edge_layout, **kwargs)
    s0, s1 = _inputs(reduction_prev, size, 0)
    weights = tf.fill([topology.num_edges(steps), len(primitives)], 0.1)
    ref(s0, s1, weights)
    fused(s0, s1, weights)
    fused_cell.load_from_reference(fused, ref)
    return ref, fused


def _alpha(steps, primitives, seed=3):
    return tf.Variable(tf.random.stateless_normal(
        [topology.num_edges(steps), len(primitives)], [seed, 0]))


def _outputs_and_grads(cell, s0, s1, alpha, cotangent, training):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([s0, s1])
        out = cell(s0, s1, tf.nn.softmax(alpha, axis=-1), training=training)
        loss = tf.reduce_sum(out * cotangent)
    grads = tape.gradient(loss, [alpha, s0, s1])
    var_grads = {id(v): g for v, g in zip(
        cell.trainable_variables,
        tape.gradient(loss, cell.trainable_variables))}
    return out, grads, var_grads


def _assert_state_equal(fused, ref):
    """Every fused variable equals the rearranged reference variables."""
    for variable, expected in fused_cell.from_reference(fused, ref):
        np.testing.assert_allclose(variable.numpy(), expected.numpy(),
                                   atol=ATOL, rtol=1e-5,
                                   err_msg=variable.path)


CASES = [
    # reduction, reduction_prev, size, primitives, edge layout
    (False, False, 7, ops.PRIMITIVES, "batched"),
    (True, False, 9, ops.PRIMITIVES, "batched"),
    (False, True, 9, ops.PRIMITIVES, "batched"),
    (False, False, 9, ops.PRIMITIVES, "split"),
    (True, False, 7, ops.PRIMITIVES, "split"),
    (False, True, 7, ops.PRIMITIVES, "split"),
    (True, False, 7, ops.PRIMITIVES[1:], "batched"),  # without none
    (False, False, 9, CONVS, "batched"),
    (True, True, 8, ("max_pool_3x3", "avg_pool_3x3", "skip_connect"),
     "batched"),
    (True, False, 7, ("skip_connect", "none", "avg_pool_3x3"), "split"),
]


@pytest.mark.parametrize(
    "reduction,reduction_prev,size,primitives,edge_layout", CASES)
def test_forward_statistics_and_gradients_match_reference(
        reduction, reduction_prev, size, primitives, edge_layout):
    ref, fused = _pair(reduction, reduction_prev, primitives, size,
                       edge_layout=edge_layout)
    alpha = _alpha(4, primitives)
    for step in range(2):
        # Training-mode calls on other data move the BN statistics.
        s0, s1 = _inputs(reduction_prev, size, 10 + step)
        w = tf.nn.softmax(alpha, axis=-1)
        np.testing.assert_allclose(
            fused(s0, s1, w, training=True).numpy(),
            ref(s0, s1, w, training=True).numpy(), atol=ATOL, rtol=1e-5)
    _assert_state_equal(fused, ref)
    s0, s1 = _inputs(reduction_prev, size, 20)
    out_shape = ref.compute_output_shape(s0.shape, s1.shape)
    cotangent = tf.random.stateless_normal(out_shape, [4, 0])
    for training in (False, True):
        out_r, grads_r, vars_r = _outputs_and_grads(
            ref, s0, s1, alpha, cotangent, training)
        out_f, grads_f, vars_f = _outputs_and_grads(
            fused, s0, s1, alpha, cotangent, training)
        assert out_f.shape == out_r.shape == out_shape
        np.testing.assert_allclose(out_f.numpy(), out_r.numpy(),
                                   atol=ATOL, rtol=1e-5)
        for name, g_f, g_r in zip(("alpha", "s0", "s1"), grads_f, grads_r):
            if g_r is None:  # only `none` ops: no path from the input
                assert g_f is None or not np.any(g_f.numpy()), name
                continue
            np.testing.assert_allclose(g_f.numpy(), g_r.numpy(), atol=1e-4,
                                       rtol=1e-4, err_msg=name)

        def fetch(v, vars_r=vars_r):
            g = vars_r.get(id(v))
            return tf.zeros(v.shape) if g is None else g

        expected = dict((id(v), g) for v, g in
                        fused_cell.from_reference(fused, ref, fetch))
        for v in fused.trainable_variables:
            np.testing.assert_allclose(
                vars_f[id(v)].numpy(), expected[id(v)].numpy(), atol=1e-4,
                rtol=1e-4, err_msg=v.path)
    # The statistics also moved alike in the training-mode gradient pass.
    _assert_state_equal(fused, ref)


@pytest.mark.parametrize("edge_layout", ["batched", "split"])
def test_only_none_gives_zeros(edge_layout):
    ref, fused = _pair(True, False, ("none",), size=7,
                       edge_layout=edge_layout)
    s0, s1 = _inputs(False, 7, 1)
    out = fused(s0, s1, tf.ones([14, 1]), training=True)
    assert out.shape == ref(s0, s1, tf.ones([14, 1])).shape == (BATCH, 4, 4,
                                                                4 * C)
    assert not np.any(out.numpy())


def test_fewer_steps_and_multiplier():
    ref, fused = _pair(True, False, ops.PRIMITIVES, size=5, steps=3,
                       multiplier=2)
    s0, s1 = _inputs(False, 5, 2)
    w = tf.nn.softmax(_alpha(3, ops.PRIMITIVES), axis=-1)
    out = fused(s0, s1, w, training=True)
    assert out.shape == (BATCH, 3, 3, 2 * C)
    np.testing.assert_allclose(out.numpy(),
                               ref(s0, s1, w, training=True).numpy(),
                               atol=ATOL, rtol=1e-5)


def test_same_trainable_parameter_count():
    for reduction, reduction_prev in ((False, False), (True, False),
                                      (False, True)):
        counts = []
        for cls in (search_space.SearchCell, fused_cell.FusedSearchCell):
            cell = cls(C, reduction, reduction_prev)
            s0, s1 = _inputs(reduction_prev, 7, 0)
            cell.build(s0.shape, s1.shape)
            counts.append(costs.count_params(cell.trainable_variables))
        # Per edge: sep convs 2 * (k * k * C + C * C), dil convs
        # k * k * C + C * C, FactorizedReduce C * C; preprocessing 1x1s.
        per_edge = (2 * (9 * C + C * C) + 2 * (25 * C + C * C)
                    + 9 * C + C * C + 25 * C + C * C)
        # 8 stride-2 edges (2 per node) in a reduction cell.
        stride2_skip = 8 * C * C if reduction else 0
        # ReLUConvBN and FactorizedReduce of the 5-channel s0 both hold
        # 5 * C weights; the 6-channel s1 gives 6 * C.
        pre = 5 * C + 6 * C
        assert counts[0] == counts[1] == 14 * per_edge + stride2_skip + pre


def test_load_into_reference_is_the_inverse():
    ref, fused = _pair(True, False, size=7)
    s0, s1 = _inputs(False, 7, 5)
    w = tf.nn.softmax(_alpha(4, ops.PRIMITIVES), axis=-1)
    fused(s0, s1, w, training=True)  # move the fused statistics only
    fresh = search_space.SearchCell(C, reduction=True)
    fresh(s0, s1, w)
    fused_cell.load_into_reference(fresh, fused)
    _assert_state_equal(fused, fresh)
    np.testing.assert_allclose(fresh(s0, s1, w).numpy(),
                               fused(s0, s1, w).numpy(), atol=ATOL,
                               rtol=1e-5)


def test_mismatched_cells_are_rejected():
    ref, _ = _pair(False, False)
    other = fused_cell.FusedSearchCell(C, reduction=True)
    s0, s1 = _inputs(False, 7, 0)
    other(s0, s1, tf.fill([14, 8], 0.1))
    with pytest.raises(ValueError, match="reduction"):
        fused_cell.load_from_reference(other, ref)


@pytest.mark.parametrize("edge_layout", ["batched", "split"])
def test_eager_and_tf_function_agree(edge_layout):
    _, fused = _pair(True, False, size=7, edge_layout=edge_layout)
    s0, s1 = _inputs(False, 7, 6)
    w = tf.nn.softmax(_alpha(4, ops.PRIMITIVES), axis=-1)
    graph = tf.function(lambda a, b, c: fused(a, b, c, training=False),
                        autograph=False)
    np.testing.assert_allclose(graph(s0, s1, w).numpy(),
                               fused(s0, s1, w, training=False).numpy(),
                               atol=1e-6, rtol=1e-6)


def test_config_round_trip():
    cell = fused_cell.FusedSearchCell(
        6, reduction=True, reduction_prev=True, steps=3, multiplier=2,
        primitives=("none", "skip_connect", "sep_conv_3x3"),
        edge_layout="split", name="c")
    config = keras.saving.serialize_keras_object(cell)
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, fused_cell.FusedSearchCell)
    assert clone.get_config() == cell.get_config()
    assert cell.get_config()["primitives"] == [
        "none", "skip_connect", "sep_conv_3x3"]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="multiplier"):
        fused_cell.FusedSearchCell(4, steps=2, multiplier=3)
    with pytest.raises(ValueError, match="primitive|op"):
        fused_cell.FusedSearchCell(4, primitives=("conv_7x7",))
    with pytest.raises(ValueError, match="even"):
        fused_cell.FusedSearchCell(5, reduction=True)
    with pytest.raises(ValueError, match="edge_layout"):
        fused_cell.FusedSearchCell(4, edge_layout="fast")


def test_state_plan_covers_every_edge_once():
    for steps in (1, 2, 4):
        for reduction in (False, True):
            plan = fused_cell.state_plan(steps, reduction)
            seen = {}
            for j, (stride, targets, edges) in enumerate(plan):
                assert stride == (2 if reduction and j < 2 else 1)
                for i, e in zip(targets, edges):
                    seen[e] = (i, j)
            expected = dict(enumerate(topology.edge_inputs(steps)))
            assert seen == expected


def test_grouped_pointwise_against_numpy():
    rng = np.random.RandomState(0)
    m, c, d = 3, 4, 5
    x = rng.randn(2, 3, 4, m * c).astype(np.float32)
    kernels = rng.randn(m, c, d).astype(np.float32)
    packed = np.concatenate(list(kernels), axis=-1)[None, None]
    y = fused_cell.grouped_pointwise(tf.constant(x), tf.constant(packed))
    expected = np.einsum("nhwmc,mcd->nhwmd", x.reshape(2, 3, 4, m, c),
                         kernels)
    np.testing.assert_allclose(y.numpy(), expected.reshape(2, 3, 4, m * d),
                               atol=1e-4, rtol=1e-4)


def test_grouped_pointwise_paths_match_per_edge_convolutions(monkeypatch):
    """Both paths (the grouped convolution where TF can differentiate one,
    the einsum elsewhere: a CPU without oneDNN, e.g. AMD, or float16 on a
    CPU) give each edge's own 1x1 convolution, values and gradients."""
    rng = np.random.RandomState(1)
    m, c, d = 3, 4, 5
    x = tf.constant(rng.randn(2, 3, 4, m * c).astype(np.float32))
    kernel = tf.constant(rng.randn(1, 1, c, m * d).astype(np.float32))
    upstream = tf.constant(rng.randn(2, 3, 4, m * d).astype(np.float32))

    def value_and_grads(pointwise):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = pointwise(x, kernel)
            loss = tf.reduce_sum(y * upstream)
        return [y] + tape.gradient(loss, [x, kernel])

    def per_edge(x, kernel):
        return tf.concat([
            tf.nn.conv2d(x[..., i * c:(i + 1) * c],
                         kernel[..., i * d:(i + 1) * d], 1, "VALID")
            for i in range(m)], -1)

    expected = value_and_grads(per_edge)
    assert not fused_cell.grouped_conv_differentiable(tf.float16)
    paths = {}
    if fused_cell.grouped_conv_differentiable(tf.float32):  # oneDNN
        paths["grouped conv"] = value_and_grads(fused_cell.grouped_pointwise)
    monkeypatch.setattr(fused_cell, "grouped_conv_differentiable",
                        lambda dtype: False)
    paths["einsum"] = value_and_grads(fused_cell.grouped_pointwise)
    for got in paths.values():
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5,
                                       atol=1e-5)


def test_search_step_runs_without_onednn(subprocess_env):
    """With oneDNN off the CPU has no grouped-conv gradient: the fused
    cells' step used to fail with 'Gradients for grouped convolutions are
    not supported on CPU'."""
    import subprocess
    import sys

    script = """
import numpy as np, tensorflow as tf
from e2rnas_tf.space import fused_cell
from e2rnas_tf.space import search_space
assert not fused_cell.grouped_conv_differentiable(tf.float32)
net = search_space.SearchNetwork(channels=4, num_classes=10, layers=3,
                                 steps=2, multiplier=2, cell_impl="fused")
x = tf.random.stateless_uniform([4, 8, 8, 3], [0, 1])
with tf.GradientTape() as tape:
    loss = tf.reduce_mean(net(x, training=True) ** 2)
grads = tape.gradient(loss, net.trainable_variables)
assert all(np.isfinite(g.numpy()).all() for g in grads if g is not None)
print("OK", len(grads))
"""
    env = dict(subprocess_env, TF_ENABLE_ONEDNN_OPTS="0")
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")


def test_bfloat16_policy_matches_float32_loosely():
    ref, fused = _pair(True, False, size=7)
    s0, s1 = _inputs(False, 7, 7)
    w = tf.nn.softmax(_alpha(4, ops.PRIMITIVES), axis=-1)
    expected = fused(s0, s1, w, training=True).numpy()
    s0, s1, w = (tf.cast(t, "bfloat16") for t in (s0, s1, w))
    # As runtime.configure does: a global policy reaches every sublayer.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = fused_cell.FusedSearchCell(C, reduction=True)
        mixed(s0, s1, w)
    finally:
        keras.config.set_dtype_policy(previous)
    fused_cell.load_from_reference(mixed, ref)
    out = mixed(s0, s1, w, training=True)
    assert out.dtype == tf.bfloat16
    stats = mixed.non_trainable_variables
    assert stats and all(v.dtype == "float32" for v in stats)
    assert all(v.dtype == "float32" for v in mixed.trainable_variables)
    # bfloat16 keeps 8 bits of mantissa: compare with a matching tolerance.
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected,
                               atol=0.1, rtol=0.05)


def test_network_of_fused_cells_matches_reference_network():
    kwargs = dict(channels=4, num_classes=5, layers=3, alpha_seed=1)
    ref = search_space.SearchNetwork(cell_impl="reference", **kwargs)
    fused = search_space.SearchNetwork(cell_impl="fused", **kwargs)
    assert all(isinstance(c, fused_cell.FusedSearchCell) for c in fused.cells)
    images = tf.random.stateless_uniform([2, 8, 8, 3], [8, 0])
    ref.build(images.shape)
    fused.build(images.shape)
    for name in ("stem_conv", "stem_bn", "classifier"):
        for f, r in zip(getattr(fused, name).weights,
                        getattr(ref, name).weights):
            f.assign(r)
    for f, r in zip(fused.arch_variables, ref.arch_variables):
        f.assign(r + tf.random.stateless_normal(r.shape, [9, 0]))
        r.assign(f)
    for f_cell, r_cell in zip(fused.cells, ref.cells):
        fused_cell.load_from_reference(f_cell, r_cell)
    # Checkpointing by variable path (as train.py does) needs unique paths.
    paths = [v.path for v in fused.weights]
    assert len(set(paths)) == len(paths)
    assert (costs.count_params(fused.weight_variables)
            == costs.count_params(ref.weight_variables))

    # Weights per image and class: summed over the batch with the same
    # weights, training-mode batch norm makes the logits' sum (almost)
    # independent of alpha, and the gradient compared would be rounding
    # noise (about 1e-5, differing by 10-60 % between the two cells).
    loss_weights = tf.random.stateless_normal([2, 5], [10, 0])

    def loss_and_grads(net):
        with tf.GradientTape() as tape:
            logits = net(images, training=True)
            loss = tf.reduce_sum(logits * loss_weights)
        return logits, tape.gradient(loss, net.arch_variables)

    logits_f, grads_f = loss_and_grads(fused)
    logits_r, grads_r = loss_and_grads(ref)
    np.testing.assert_allclose(logits_f.numpy(), logits_r.numpy(),
                               atol=1e-4, rtol=1e-4)
    for g_f, g_r in zip(grads_f, grads_r):
        scale = float(np.max(np.abs(g_r.numpy())))
        assert scale > 0.1  # a gradient, not rounding noise
        np.testing.assert_allclose(g_f.numpy(), g_r.numpy(),
                                   atol=1e-4 * scale, rtol=1e-4)
