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
                gradient_step=True, updates_moving_stats=None, seed=0):
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

    # Config round-trip: through JSON and the registered-name lookup, so a
    # missing registration or an unserialisable field fails here.
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
    # from_config directly as well (what a parent layer's config uses).
    rebuilt = type(layer).from_config(config)
    _call(rebuilt, inputs, False, takes_training)
    rebuilt.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        _call(rebuilt, inputs, False, takes_training).numpy(), out.numpy(),
        rtol=RTOL, atol=ATOL)

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
    for training in (False, True):
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
