"""DARTS' per-epoch cosine learning rate, for both levels and retraining.

``lr_min + (lr - lr_min) * (1 + cos(pi * epoch / epochs)) / 2``, as
PyTorch's ``CosineAnnealingLR`` stepped once per epoch with
``T_max = epochs``: the search's weights (inside the compiled step, from
its step counter) and retraining (once per epoch, in Python) follow it.
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = ["cosine_lr"]


def cosine_lr(epoch, epochs, lr, lr_min=0.0):
    """The learning rate of ``epoch`` (0-based) of ``epochs``.

    Args:
        epoch: a Python number, or a scalar tensor (then the result is a
            float32 tensor); epochs past the end keep ``lr_min``.
        epochs: length of the run in epochs.
        lr: the initial learning rate.
        lr_min: the value approached at the end.

    Returns:
        A float, or a float32 scalar tensor.

    Example:

    >>> cosine_lr(0, 10, 0.1), cosine_lr(5, 10, 0.1)
    (0.1, 0.05...)
    """
    epochs = float(max(int(epochs), 1))
    if tf.is_tensor(epoch):
        frac = tf.minimum(tf.cast(epoch, tf.float32) / epochs, 1.0)
        return lr_min + 0.5 * (lr - lr_min) * (1.0 + tf.cos(math.pi * frac))
    frac = min(epoch / epochs, 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * frac))
