"""Optimisers and the dynamic loss scale, for the search and retraining.

Both levels of the search and retraining update their variables the same
way, PyTorch's: SGD with momentum and L2 in the gradient (`MomentumSGD`;
the weights, as DARTS), Adam with L2 in the gradient (`AdamL2`; alpha), and
under ``mixed_float16`` one dynamic loss scale (`DynamicLossScale`, Keras'
schedule). Each returns new values instead of assigning them, so a step
that turns out non-finite can be dropped as a whole; `assign` writes them
from a replica context, the path mirrored variables need.

Where these run: inside compiled steps, in a replica context (after the
gradients were all-reduced, so every replica computes the same values) or
in the cross-replica context.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["AdamL2", "DynamicLossScale", "MomentumSGD", "all_finite",
           "all_reduce", "assign", "global_norm", "raw_variable"]

# Keras' LossScaleOptimizer: initial scale, halved on overflow (down to 1),
# doubled after this many finite steps.
INITIAL_LOSS_SCALE = 2.0 ** 15
GROWTH_PERIOD = 2000


def all_reduce(values):
    """Sums a nested structure of tensors over the replicas.

    Runs in a replica context; with a single replica it is the identity.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def raw_variable(variable):
    """The `tf.Variable` behind a Keras variable (itself for tf.Variable)."""
    return variable.value if hasattr(variable, "_value") else variable


def assign(variables, values):
    """Writes ``values`` into ``variables`` from a replica context.

    Goes through `merge_call` and `extended.update`, the path that works for
    mirrored variables; every replica computes the same values (all inputs
    were all-reduced), so any replica's copy is the right one.
    """
    variables = [raw_variable(v) for v in variables]

    def merge_fn(strategy, *vals):
        for var, val in zip(variables, vals):
            strategy.extended.update(
                var, lambda v, x: v.assign(x), args=(val,), group=False)

    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context
        for var, val in zip(variables, values):
            var.assign(val)
        return
    ctx.merge_call(merge_fn, args=tuple(values))


def global_norm(tensors):
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(t, tf.float32)))
                             for t in tensors]))


def all_finite(tensors):
    return tf.reduce_all(tf.stack(
        [tf.reduce_all(tf.math.is_finite(t)) for t in tensors]))


class MomentumSGD(tf.Module):
    """SGD with momentum and L2 weight decay, with PyTorch's semantics.

    ``g <- g + wd * w``; ``buf <- momentum * buf + g``; ``w <- w - lr * buf``
    (the L2 term is added to the gradient, not decoupled; the buffer does not
    contain the learning rate, so a changing lr acts at once). `updates`
    returns new values rather than assigning them, so the caller can drop a
    whole step.

    Args:
        variables: the variables it optimises (for the buffer shapes).
        momentum: momentum factor.
        weight_decay: L2 coefficient.
    """

    def __init__(self, variables, momentum, weight_decay, name="sgd"):
        super().__init__(name=name)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.buffers = [
            tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                        name=f"momentum_{i}")
            for i, v in enumerate(variables)]

    def virtual_step(self, values, grads, lr):
        """DARTS' unrolled weights ``w - lr (m * buf + g + wd * w)``."""
        # Shared scalar tensors: one constant per graph, not one per weight.
        momentum = tf.constant(self.momentum)
        decay = tf.constant(self.weight_decay)
        return [w - lr * (momentum * b + g + decay * w)
                for w, b, g in zip(values, self.buffers, grads)]

    def updates(self, values, grads, lr, apply=None):
        """``(new_values, new_buffers)`` of one step (nothing assigned).

        With ``apply`` (a bool scalar) False the returned values equal the
        current ones exactly, whatever the (possibly NaN) gradients: the
        gradient is replaced by 0, the momentum by 1 and the lr by 0, which
        costs three scalar selects instead of two per weight.
        """
        momentum = tf.constant(self.momentum)
        decay = tf.constant(self.weight_decay)
        grads = [g + decay * w for w, g in zip(values, grads)]
        if apply is not None:
            grads = [tf.where(apply, g, tf.zeros_like(g)) for g in grads]
            momentum = tf.where(apply, momentum, 1.0)
            lr = tf.where(apply, lr, 0.0)
        new_buffers = [momentum * b + g for b, g in zip(self.buffers, grads)]
        new_values = [w - lr * b for w, b in zip(values, new_buffers)]
        return new_values, new_buffers


class AdamL2(tf.Module):
    """Adam with L2 weight decay added to the gradient (PyTorch's Adam).

    ``g <- g + wd * p``; the usual bias-corrected moments; ``p <- p - lr *
    m_hat / (sqrt(v_hat) + eps)`` with ``eps`` outside the square root, as
    PyTorch, so DARTS' hyper-parameters carry over.

    Args:
        variables: the variables it optimises (for the moment shapes).
        beta1, beta2: moment decay rates.
        weight_decay: L2 coefficient.
        epsilon: denominator offset.
    """

    def __init__(self, variables, beta1, beta2, weight_decay, epsilon=1e-8,
                 name="adam"):
        super().__init__(name=name)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.weight_decay = float(weight_decay)
        self.epsilon = float(epsilon)
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False,
                                      name="iterations")
        self.m = [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                              name=f"m_{i}") for i, v in enumerate(variables)]
        self.v = [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                              name=f"v_{i}") for i, v in enumerate(variables)]

    def updates(self, values, grads, lr):
        """``(new_values, new_m, new_v, new_iterations)`` (nothing assigned)."""
        t = self.iterations + 1
        tf32 = tf.cast(t, tf.float32)
        new_m, new_v, new_values = [], [], []
        for p, g, m, v in zip(values, grads, self.m, self.v):
            g = g + self.weight_decay * p
            m = self.beta1 * m + (1.0 - self.beta1) * g
            v = self.beta2 * v + (1.0 - self.beta2) * tf.square(g)
            m_hat = m / (1.0 - tf.pow(self.beta1, tf32))
            v_hat = v / (1.0 - tf.pow(self.beta2, tf32))
            new_values.append(p - lr * m_hat / (tf.sqrt(v_hat) + self.epsilon))
            new_m.append(m)
            new_v.append(v)
        return new_values, new_m, new_v, t


class DynamicLossScale(tf.Module):
    """The dynamic loss scale of ``mixed_float16`` (Keras' schedule).

    Losses are multiplied by the scale before differentiation and the
    gradients divided by it after, so small float16 gradients do not
    underflow. A step with a non-finite gradient is skipped by the caller
    and halves the scale (down to 1); `GROWTH_PERIOD` finite steps in a row
    double it. Disabled (float32, bfloat16), the scale is 1 and nothing
    changes.

    Args:
        enabled: whether to scale.
    """

    def __init__(self, enabled, name="loss_scale"):
        super().__init__(name=name)
        self.enabled = bool(enabled)
        self.scale = tf.Variable(INITIAL_LOSS_SCALE if self.enabled else 1.0,
                                 dtype=tf.float32, trainable=False,
                                 name="scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                      name="good_steps")

    def scale_loss(self, loss):
        return loss * self.scale if self.enabled else loss

    def unscale(self, grads):
        if not self.enabled:
            return grads
        return [g / self.scale for g in grads]

    def updates(self, ok):
        """``(variables, new_values)`` after a step that was ``ok``
        (finite); empty when disabled."""
        if not self.enabled:
            return [], []
        good = tf.where(ok, self.good_steps + 1, 0)
        grow = good >= GROWTH_PERIOD
        scale = tf.where(ok, tf.where(grow, self.scale * 2.0, self.scale),
                         tf.maximum(self.scale * 0.5, 1.0))
        return ([self.good_steps, self.scale],
                [tf.where(grow, tf.zeros_like(good), good), scale])
