"""A non-finite GRADIENT (the loss stays finite) in ``e2rnas train``: the
step is skipped with every variable unchanged, reported, and after
``max_consecutive_skips`` in a row the run stops with the last finite state
saved, from which the same command resumes. (The search's counterpart is
tests/test_search.py::test_nonfinite_alpha_gradient_skips_steps_then_stops.)
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf import config_lib
from e2rnas_tf.space import model as model_lib
from e2rnas_tf.training import train as train_lib


def _config():
    c = config_lib.train_config()
    c.genotype = "DARTS_V2"
    c.data.image_size = 8
    c.data.num_train = 64
    c.data.num_test = 16
    c.model.layers = 3
    c.model.channels = 4
    c.batch_size = 8
    c.eval_batch_size = 16
    c.epochs = 1
    c.steps_per_epoch = 6
    c.max_consecutive_skips = 2
    c.lock()
    return c


def _poison_logit_gradient(monkeypatch, bad_steps):
    """NaN gradients (finite logits and loss) at the training steps whose
    0-based counter is in ``bad_steps``: the counter is read in the graph
    from the drop-path seed ``[seed + 1, step * replicas + replica]`` that
    the training step passes to `DerivedNetwork.call_with_aux`."""
    bad = tf.constant(sorted(bad_steps), tf.int64)
    real = model_lib.DerivedNetwork.call_with_aux

    def poisoned(self, inputs, training=True, drop_seed=None):
        logits, aux_logits = real(self, inputs, training=training,
                                  drop_seed=drop_seed)
        hit = tf.reduce_any(tf.equal(tf.cast(drop_seed[1], tf.int64), bad))

        @tf.custom_gradient
        def poison(x):
            def grad(dy):
                return dy * tf.where(hit, tf.constant(np.nan, dy.dtype),
                                     tf.constant(1.0, dy.dtype))
            return tf.identity(x), grad

        return poison(logits), aux_logits

    monkeypatch.setattr(model_lib.DerivedNetwork, "call_with_aux", poisoned)


def _record_steps(monkeypatch):
    """Every training step's variables (model, optimizer, loss scale)
    before and after, with its outputs."""
    calls = []
    real = train_lib.make_train_step

    def make(model, sgd, loss_scale, strategy, config):
        step_fn = real(model, sgd, loss_scale, strategy, config)
        state = (list(model.weights) + list(sgd.variables)
                 + list(loss_scale.variables))

        def recording(images, labels, step, lr):
            before = [v.numpy().copy() for v in state]
            out = step_fn(images, labels, step, lr)
            calls.append({"before": before,
                          "after": [v.numpy().copy() for v in state],
                          "out": {k: float(v) for k, v in out.items()}})
            return out

        return recording

    monkeypatch.setattr(train_lib, "make_train_step", make)
    return calls


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y)
                                    for x, y in zip(a, b))


def test_nonfinite_gradient_skips_training_steps_then_stops(
        tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "run")
    config = _config()
    with monkeypatch.context() as patch:
        _poison_logit_gradient(patch, {1, 3, 4})
        calls = _record_steps(patch)
        with pytest.raises(train_lib.TrainingDiverged,
                           match="2 consecutive training steps had a "
                                 "non-finite loss or gradient"):
            train_lib.train(config, workdir)
    printed = capsys.readouterr().out

    assert [c["out"]["skipped"] for c in calls] == [0.0, 1.0, 0.0, 1.0, 1.0]
    for c in calls:
        assert np.isfinite(c["out"]["loss"])  # only the gradient is NaN
        if c["out"]["skipped"]:
            assert not np.isfinite(c["out"]["grad_norm"])
            # Weights, batch-norm statistics, momentum, counters.
            assert _same(c["before"], c["after"])
        else:
            assert np.isfinite(c["out"]["grad_norm"])
            assert not _same(c["before"], c["after"])
    assert "step 2 skipped: non-finite loss" in printed
    assert "or gradient norm nan (1 in a row)" in printed
    assert "step 5 skipped" in printed and "(2 in a row)" in printed

    # The checkpoint left holds the state after the last finite step; the
    # same command (gradients finite again) resumes from it and finishes.
    with monkeypatch.context() as patch:
        resumed = _record_steps(patch)
        summary = train_lib.train(config, workdir)
    assert _same(resumed[0]["before"], calls[-1]["after"])
    assert _same(calls[-1]["after"], calls[2]["after"])
    assert len(resumed) == 1 and summary["steps"] == 6
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        (record,) = [json.loads(line) for line in f]
    assert record["epoch"] == 0 and np.isfinite(record["test_loss"])
