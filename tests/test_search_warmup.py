"""The architecture warm-up (config.arch.warmup_epochs): only w moves."""

import numpy as np
import pytest
import tensorflow as tf

from tests.search_util import batch, make_step, tiny_config, values


def test_warmup_keeps_alpha_and_adam_then_releases_them(eager):
    config = tiny_config(**{"arch.warmup_epochs": 1, "arch.lr": 0.1})
    net, step = make_step(config)   # steps_per_epoch=10
    step.warmup_steps = tf.constant(2, tf.int64)   # two warm-up steps
    alpha0 = values(net.arch_variables)
    w0 = values(net.weight_variables)
    for i in range(2):
        metrics = step(batch(i), batch(10 + i))
        assert float(metrics["arch_lr"]) == 0.0
    for a, b in zip(values(net.arch_variables), alpha0):
        np.testing.assert_array_equal(a, b)
    assert int(step.arch_optimizer.iterations.numpy()) == 0
    for m in step.arch_optimizer.m:
        np.testing.assert_array_equal(m.numpy(), 0.0)
    # w trained during the warm-up.
    assert any(np.abs(a - b).max() > 0
               for a, b in zip(values(net.weight_variables), w0))
    metrics = step(batch(2), batch(12))
    assert float(metrics["arch_lr"]) == pytest.approx(0.1)
    assert int(step.arch_optimizer.iterations.numpy()) == 1
    assert max(np.abs(a - b).max()
               for a, b in zip(values(net.arch_variables), alpha0)) > 1e-3


def test_warmup_steps_follow_epochs():
    config = tiny_config(**{"arch.warmup_epochs": 3})
    _, step = make_step(config)
    assert int(step.warmup_steps) == 30


@pytest.mark.parametrize("bad", [-1, -5])
def test_bad_warmup_is_refused(bad):
    config = tiny_config()
    with config.unlocked():
        config.arch.warmup_epochs = bad
    with pytest.raises(ValueError, match="warmup_epochs"):
        make_step(config)
