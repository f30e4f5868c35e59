"""e2rnas_tf.schedules: DARTS' cosine, in Python and in the graph."""

import math

import pytest
import tensorflow as tf

from e2rnas_tf import schedules


def test_cosine_lr_by_hand():
    assert schedules.cosine_lr(0, 600, 0.025) == pytest.approx(0.025)
    assert schedules.cosine_lr(300, 600, 0.025) == pytest.approx(0.0125)
    assert schedules.cosine_lr(600, 600, 0.025, 0.001) == pytest.approx(0.001)
    lrs = [schedules.cosine_lr(e, 10, 0.1) for e in range(10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[3] == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.3)))


def test_tensor_epochs_match_and_stop_at_the_end():
    for epoch in (0, 3, 9, 10, 14):
        got = schedules.cosine_lr(tf.constant(epoch, tf.int64), 10, 0.025,
                                  0.001)
        assert got.dtype == tf.float32
        assert float(got) == pytest.approx(
            schedules.cosine_lr(min(epoch, 10), 10, 0.025, 0.001), rel=1e-6)
