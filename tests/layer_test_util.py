"""A reusable check for Keras layers, in the spirit of Keras' own
``layer_test``: output shape, weight counts, config round-trip, eager versus
``tf.function`` parity and one gradient step.

Example:

    check_layer(lambda: ops.SepConv(4, 3, 2), [x],
                expected_output_shape=(2, 4, 4, 4),
                expected_trainable=2 * (9 * 4 + 16),
                expected_non_trainable=4 * 4)
"""

from __future__ import annotations

import json

import keras
import numpy as np
import tensorflow as tf

# float32 reductions over a few hundred terms: differences of a few ulps.
ATOL = 1e-5
RTOL = 1e-5


def count(variables):
    """Number of scalars in ``variables``."""
    return int(sum(np.prod(v.shape) for v in variables))


def _call(layer, inputs, training, takes_training):
    if takes_training:
        return layer(*inputs, training=training)
    return layer(*inputs)


def check_layer(make_layer, inputs, *, expected_output_shape,
                expected_trainable=None, expected_non_trainable=None,
                takes_training=True, compute_output_shape=True,
                gradient_step=True, updates_moving_stats=None,
                graph_modes=(False, True), seed=0):
    """Runs the standard checks on the layer ``make_layer()`` builds.

    Args:
        make_layer: zero-argument callable returning a fresh, unbuilt layer.
        inputs: list of positional call arguments (tensors / arrays).
        expected_output_shape: full output shape for ``inputs``.
        expected_trainable: expected number of trainable scalars.
        expected_non_trainable: expected number of non-trainable scalars.
        takes_training: whether ``call`` accepts ``training``.
        compute_output_shape: also check ``compute_output_shape``.
        gradient_step: take one SGD step on a random linear loss of the
            training-mode output and require every trainable variable to
            change (skipped if the layer has none).
        updates_moving_stats: if true, a training-mode call must change the
            non-trainable variables and an inference-mode call must not.
        graph_modes: the ``training`` values at which eager and
            ``tf.function`` outputs are compared (each costs a trace).
        seed: seed of the random loss weights.

    Returns:
        The built layer (after the gradient step).
    """
    inputs = [tf.convert_to_tensor(x) for x in inputs]
    layer = make_layer()
    out = _call(layer, inputs, False, takes_training)
    assert tuple(out.shape) == tuple(expected_output_shape), (
        f"{layer.name}: output shape {tuple(out.shape)}, expected "
        f"{tuple(expected_output_shape)}")
    if compute_output_shape:
        shape = layer.compute_output_shape(*[tuple(x.shape) for x in inputs])
        assert tuple(shape) == tuple(expected_output_shape)
    assert np.all(np.isfinite(out.numpy()))

    # Weight counts.
    if expected_trainable is not None:
        assert count(layer.trainable_weights) == expected_trainable, (
            f"{layer.name}: {count(layer.trainable_weights)} trainable "
            f"scalars, expected {expected_trainable}")
    if expected_non_trainable is not None:
        assert count(layer.non_trainable_weights) == expected_non_trainable, (
            f"{layer.name}: {count(layer.non_trainable_weights)} "
            f"non-trainable scalars, expected {expected_non_trainable}")

    # Config round-trip: through JSON and the registered-name lookup (which
    # ends in ``from_config``), so a missing registration or an
    # unserialisable field fails here.
    config = layer.get_config()
    serialized = json.loads(json.dumps(
        keras.saving.serialize_keras_object(layer)))
    clone = keras.saving.deserialize_keras_object(serialized)
    assert type(clone) is type(layer)
    clone_out = _call(clone, inputs, False, takes_training)
    assert clone.get_config() == config
    assert [w.shape for w in clone.weights] == [w.shape for w in layer.weights]
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        _call(clone, inputs, False, takes_training).numpy(), out.numpy(),
        rtol=RTOL, atol=ATOL)
    del clone_out

    # Moving statistics: inference leaves them alone, training moves them.
    if updates_moving_stats is not None:
        before = [v.numpy().copy() for v in layer.non_trainable_weights]
        _call(layer, inputs, False, takes_training)
        after = [v.numpy() for v in layer.non_trainable_weights]
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
        _call(layer, inputs, True, takes_training)
        after = [v.numpy() for v in layer.non_trainable_weights]
        changed = [not np.array_equal(a, b) for a, b in zip(before, after)]
        assert all(changed) if updates_moving_stats else not any(changed)

    # Eager versus graph, in both modes (training-mode output depends only
    # on the batch, so moving-statistic updates between calls don't matter).
    for training in graph_modes:
        eager = _call(layer, inputs, training, takes_training)
        graph = tf.function(
            lambda *xs, t=training: _call(layer, xs, t, takes_training),
            autograph=False)(*inputs)
        np.testing.assert_allclose(graph.numpy(), eager.numpy(),
                                   rtol=RTOL, atol=ATOL)

    # One gradient step. A random linear loss, since the sum of a batch
    # norm's output has zero gradient.
    if gradient_step and layer.trainable_weights:
        rng = np.random.RandomState(seed)
        target = tf.constant(rng.randn(*out.shape).astype(np.float32))
        variables = layer.trainable_weights
        with tf.GradientTape() as tape:
            y = _call(layer, inputs, True, takes_training)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * target)
        grads = tape.gradient(loss, variables)
        before = [v.numpy().copy() for v in variables]
        for v, g in zip(variables, grads):
            assert g is not None, f"no gradient for {v.path}"
            assert np.all(np.isfinite(g.numpy())), v.path
        keras.optimizers.SGD(learning_rate=0.1).apply_gradients(
            zip(grads, variables))
        for v, b in zip(variables, before):
            assert not np.array_equal(v.numpy(), b), (
                f"{v.path} did not change after a gradient step")
    return layer


# ---------------------------------------------------------------------------
# Hand formulas for parameter counts, independent of the layers' code: an
# affine batch norm learns 2 * C scalars and every batch norm keeps 2 * C
# moving statistics.


def op_counts(name, c, stride, affine):
    """(trainable, non-trainable) scalars of ``ops.make_op(name, c, stride)``.

    sep_conv_k: two blocks of depthwise k*k*C, pointwise C*C, BN;
    dil_conv_k: one such block; skip_connect at stride 2: FactorizedReduce,
    two 1x1 convs C -> C/2 and a BN; pooling, none, identity: nothing.
    """
    bn = 2 * c if affine else 0
    if name in ("none", "max_pool_3x3", "avg_pool_3x3"):
        return 0, 0
    if name == "skip_connect":
        return (0, 0) if stride == 1 else (2 * c * (c // 2) + bn, 2 * c)
    k = int(name[-1])
    block = k * k * c + c * c + bn
    if name.startswith("sep_conv"):
        return 2 * block, 4 * c
    if name.startswith("dil_conv"):
        return block, 2 * c
    raise ValueError(name)


def mixed_op_counts(c, stride, primitives):
    """Search-time (non-affine) mixed op; pools get a non-affine BN each."""
    trainable = sum(op_counts(p, c, stride, False)[0] for p in primitives)
    non_trainable = sum(op_counts(p, c, stride, False)[1] for p in primitives)
    non_trainable += 2 * c * sum("pool" in p for p in primitives)
    return trainable, non_trainable


def search_cell_counts(c, c_prev_prev, c_prev, reduction, primitives,
                       steps=4):
    """Preprocessing (1x1 conv or FactorizedReduce: both C_in * C weights,
    non-affine BN) plus every edge's mixed op."""
    trainable = c_prev_prev * c + c_prev * c
    non_trainable = 2 * (2 * c)
    for node in range(steps):
        for j in range(node + 2):
            stride = 2 if reduction and j < 2 else 1
            t, n = mixed_op_counts(c, stride, primitives)
            trainable += t
            non_trainable += n
    return trainable, non_trainable


def search_network_counts(channels, layers, num_classes, primitives,
                          steps=4, multiplier=4, stem_multiplier=3):
    """(weights, non-trainable, alphas) of a `SearchNetwork`."""
    c_stem = stem_multiplier * channels
    weights = 3 * 3 * 3 * c_stem + 2 * c_stem  # stem conv + affine BN
    non_trainable = 2 * c_stem
    c_prev_prev, c_prev, c = c_stem, c_stem, channels
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        if reduction:
            c *= 2
        t, n = search_cell_counts(c, c_prev_prev, c_prev, reduction,
                                  primitives, steps)
        weights += t
        non_trainable += n
        c_prev_prev, c_prev = c_prev, multiplier * c
    weights += c_prev * num_classes + num_classes
    edges = sum(2 + i for i in range(steps))
    return weights, non_trainable, 2 * edges * len(primitives)
