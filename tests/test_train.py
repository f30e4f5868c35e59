"""Tests for e2rnas_tf.training.train: schedules, the compiled step, `e2rnas train`."""

import json
import math
import os
import pathlib
import subprocess
import sys

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf import config_lib, optim
from e2rnas_tf import data as data_lib
from e2rnas_tf.runs import workdir as workdir_lib
from e2rnas_tf.space import costs, genotypes
from e2rnas_tf.space import model as model_lib
from e2rnas_tf.training import train as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY_CONFIG = '''
from e2rnas_tf import config_lib


def get_config():
    c = config_lib.train_config()
    c.genotype = "DARTS_V2"
    c.data.image_size = 8
    c.data.num_train = 64
    c.data.num_test = 20
    c.data.cutout = 4
    c.model.layers = 3
    c.model.channels = 4
    c.batch_size = 16
    c.eval_batch_size = 16
    c.epochs = 2
    c.steps_per_epoch = 2
    c.lock()
    return c
'''


def test_drop_path_schedule():
    assert train_lib.drop_path_at(0, 600, 0.2) == 0.0
    assert train_lib.drop_path_at(300, 600, 0.2) == pytest.approx(0.1)
    assert train_lib.drop_path_at(599, 600, 0.2) < 0.2


def _step_config(**adv):
    c = config_lib.train_config()
    c.batch_size = 8
    c.model.auxiliary_weight = 0.4
    c.optim.lr = 0.05
    c.optim.momentum = 0.0
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 0.5
    c.adv_train.update(adv)
    return c


def _tiny_net():
    net = model_lib.DerivedNetwork("E2RNAS", channels=4, layers=3,
                                   num_classes=5, auxiliary=True)
    net.build((None, 8, 8, 3))
    return net


def test_train_step_matches_clipped_l2_sgd():
    """One compiled step = SGD on clip(grad, 0.5) + wd * w, from a
    reference gradient computed independently with a tape."""
    config = _step_config()
    net = _tiny_net()
    strategy = tf.distribute.get_strategy()
    sgd = optim.MomentumSGD(net.trainable_variables, 0.0,
                            config.optim.weight_decay)
    images = tf.random.stateless_uniform([8, 8, 8, 3], seed=[0, 1])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
    weights = [v.numpy().copy() for v in net.trainable_variables]

    with tf.GradientTape() as tape:
        logits, aux = net.call_with_aux(images, training=True)
        ce = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        aux_ce = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, aux))
        loss = ce + 0.4 * aux_ce
    grads = [g.numpy() for g in tape.gradient(loss,
                                              net.trainable_variables)]
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    factor = min(1.0, 0.5 / norm)
    expected = [w - 0.05 * (g * factor + 0.01 * w)
                for w, g in zip(weights, grads)]

    step = train_lib.make_train_step(net, sgd, optim.DynamicLossScale(False),
                                     strategy, config)
    out = step(images, labels, tf.constant(0, tf.int64),
               tf.constant(config.optim.lr))
    # The run checkpoints the epoch's sums of these, in this order.
    assert tuple(out) == train_lib.STEP_METRICS == (
        "loss", "ce", "aux_ce", "accuracy", "grad_norm", "loss_scale",
        "skipped")
    assert float(out["skipped"]) == 0.0
    assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(out["grad_norm"]) == pytest.approx(norm, rel=1e-4)
    assert norm > 0.5  # the clip was active
    for v, e in zip(net.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6)


def test_adversarial_train_step_runs_and_changes_weights():
    config = _step_config(enabled=True, ratio=0.5)
    config.adv_train.attack.update(name="pgd", eps=8.0, steps=2)
    net = _tiny_net()
    step = train_lib.make_train_step(
        net, optim.MomentumSGD(net.trainable_variables, 0.9, 3e-4),
        optim.DynamicLossScale(False), tf.distribute.get_strategy(), config)
    images = tf.random.stateless_uniform([8, 8, 8, 3], seed=[0, 2])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
    before = [v.numpy().copy() for v in net.trainable_variables]
    out = step(images, labels, tf.constant(3, tf.int64), tf.constant(0.05))
    assert np.isfinite(float(out["loss"]))
    assert any(not np.array_equal(b, v.numpy())
               for b, v in zip(before, net.trainable_variables))


def _run(workdir, config_path, *extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="2",
               PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", "train",
         f"--config={config_path}", f"--workdir={workdir}", *extra],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    config_path = root / "tiny.py"
    config_path.write_text(TINY_CONFIG)
    workdir = root / "run"
    result = _run(workdir, config_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, config_path, result


def test_cli_train_writes_the_run(tiny_run):
    workdir, config_path, result = tiny_run
    for name in ("config.json", "genotype.json", "metrics.jsonl",
                 "model_last.keras", "model_best.keras", "summary.json"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "checkpoints").glob("ckpt-4.index"))
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert "best test accuracy" in result.stdout

    config = json.loads((workdir / "config.json").read_text())
    assert config["epochs"] == 2 and config["model"]["layers"] == 3
    assert genotypes.Genotype.load(workdir / "genotype.json") == \
        genotypes.PUBLISHED["DARTS_V2"]

    records = [json.loads(line) for line in
               (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert [r["step"] for r in records] == [2, 4]
    assert [r["lr"] for r in records] == pytest.approx([0.025, 0.0125])
    assert [r["drop_path_rate"] for r in records] == pytest.approx([0, 0.1])
    for r in records:
        assert np.isfinite(r["train_loss"]) and r["train_aux_ce"] > 0
        assert 0.0 <= r["test_accuracy"] <= 1.0
    best = max(r["test_accuracy"] for r in records)
    assert records[-1]["best_test_accuracy"] == pytest.approx(best)

    # The saved model reproduces the logged test accuracy on the same data.
    model = keras.models.load_model(workdir / "model_last.keras")
    assert isinstance(model, model_lib.DerivedNetwork)
    assert float(model.drop_path_rate.numpy()) == pytest.approx(0.1)
    data_cfg = ml_collections.ConfigDict(config["data"])
    _, test, info = data_lib.load(data_cfg)
    logits = model(tf.constant(test.images, tf.float32) / 255.0)
    accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
    assert accuracy == pytest.approx(records[-1]["test_accuracy"])

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["params"] == costs.count_params(model)
    assert summary["steps"] == 4
    # What `e2rnas export` names the served classes with.
    assert summary["class_names"] == list(info.class_names)
    assert len(summary["class_names"]) == summary["num_classes"] == 10


def test_cli_train_refuses_a_different_run(tiny_run):
    workdir, config_path, _ = tiny_run
    before = (workdir / "metrics.jsonl").read_text()
    result = _run(workdir, config_path, "--config.optim.lr=0.1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"e2rnas train: error: {workdir} holds "
                                "another run (optim.lr: 0.025 there, 0.1 "
                                "here)")
    assert "--overwrite" in lines[-1]
    assert (workdir / "metrics.jsonl").read_text() == before


def test_workdir_identity(tiny_run, tmp_path):
    """A train run's identity: its config up to the non-identity fields,
    and its genotype (runs.workdir.claim decides)."""
    workdir, _, _ = tiny_run
    config = json.loads((workdir / "config.json").read_text())
    darts = genotypes.PUBLISHED["DARTS_V2"]
    e2rnas = genotypes.PUBLISHED["E2RNAS"]

    def check(directory, config_dict, genotype, overwrite):
        return workdir_lib.claim(
            str(directory), train_lib._identity(config_dict, genotype),
            record="config.json", read=train_lib._reader(str(directory)),
            outputs=train_lib.OUTPUTS, overwrite=overwrite)

    assert check(workdir, config, darts, False).resume
    # Logging and evaluation fields may change on resume; a different
    # genotype may not.
    relaxed = dict(config, log_every=1, checkpoint_every=7,
                   evaluate=dict(config["evaluate"], epsilons=[4.0]))
    assert check(workdir, relaxed, darts, False).resume
    with pytest.raises(workdir_lib.WorkdirError,
                       match="genotype.normal.*--overwrite"):
        check(workdir, config, e2rnas, False)
    claim = check(workdir, config, e2rnas, True)
    assert not claim.resume
    assert {"checkpoints", "config.json", "model_last.keras"} <= set(
        claim.stale)
    # Outputs without a config.json belong to an unknown run.
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(workdir_lib.WorkdirError, match="no config.json"):
        check(tmp_path, config, darts, False)
    assert check(tmp_path / "new", config, darts, False) == \
        workdir_lib.Claim(resume=False)


def test_cli_train_overwrite_and_resume(tiny_run, tmp_path):
    _, config_path, _ = tiny_run
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"epoch": 0}\n')
    result = _run(workdir, config_path, "--overwrite",
                  "--config.steps_per_epoch=1", "--genotype=E2RNAS")
    assert result.returncode == 0, result.stderr[-3000:]
    assert genotypes.Genotype.load(workdir / "genotype.json") == \
        genotypes.PUBLISHED["E2RNAS"]
    records = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == [1, 2]
    # The same run again resumes from its checkpoint: nothing left to do.
    result = _run(workdir, config_path, "--config.steps_per_epoch=1",
                  "--genotype=E2RNAS")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already complete" in result.stdout
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2


def _tiny_config():
    c = config_lib.train_config()
    c.genotype = "DARTS_V2"
    c.data.update(image_size=8, num_train=48, num_test=10, cutout=4)
    c.model.update(layers=3, channels=4, drop_path=0.0)
    c.batch_size = 16
    c.eval_batch_size = 16
    c.epochs = 2
    c.steps_per_epoch = 2
    c.checkpoint_every = 1
    return c


def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    config = _tiny_config()
    train_lib.train(config, str(tmp_path / "full"))
    part = tmp_path / "part"
    train_lib.train(config, str(part))
    # Simulate a crash after step 3 (mid-way through the second epoch).
    checkpoints = part / "checkpoints"
    for path in checkpoints.glob("ckpt-4.*"):
        path.unlink()
    tf.compat.v1.train.update_checkpoint_state(str(checkpoints),
                                               str(checkpoints / "ckpt-3"))
    (part / "model_last.keras").unlink()
    summary = train_lib.train(config, str(part))
    assert summary["steps"] == 4
    records = [json.loads(line) for line in
               (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    full = keras.models.load_model(tmp_path / "full" / "model_last.keras")
    resumed = keras.models.load_model(part / "model_last.keras")
    for a, b in zip(full.weights, resumed.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1e-6, err_msg=a.path)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_train_step_under_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        net = _tiny_net()
        sgd = optim.MomentumSGD(net.trainable_variables, 0.9, 0.01)
        loss_scale = optim.DynamicLossScale(policy == "mixed_float16")
        if loss_scale.enabled:
            # A loss scale of 2**24 overflows float16 gradients for sure.
            loss_scale.scale.assign(2.0 ** 24)
        step = train_lib.make_train_step(
            net, sgd, loss_scale, tf.distribute.get_strategy(),
            _step_config())
        images = tf.random.stateless_uniform([8, 8, 8, 3], seed=[0, 3])
        labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
        # Under float16 a step may overflow at the current loss scale: it
        # must then leave the weights alone and halve the scale.
        records = []
        for i in range(4):
            before = [v.numpy().copy() for v in net.trainable_variables]
            out = step(images, labels, tf.constant(i, tf.int64),
                       tf.constant(0.05))
            after = [v.numpy().copy() for v in net.trainable_variables]
            records.append((before, {k: float(v) for k, v in out.items()},
                            after))
        logits = net(images)
        final_scale = float(loss_scale.scale.numpy())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == tf.float32
    assert all(v.dtype == "float32" for v in net.trainable_variables)
    scales = [out["loss_scale"] for _, out, _ in records] + [final_scale]
    if policy == "mixed_bfloat16":
        assert scales == [1.0] * 5
    for k, (before, out, after) in enumerate(records):
        changed = any(not np.array_equal(b, a) for b, a in zip(before, after))
        if np.isfinite(out["grad_norm"]):
            # The reported norm is in loss units, not loss-scale units.
            assert 0.0 < out["grad_norm"] < 1e3
            assert changed and scales[k + 1] >= scales[k]
        else:
            assert policy == "mixed_float16"
            assert not changed and scales[k + 1] == scales[k] / 2
        assert all(np.all(np.isfinite(a)) for a in after)
    finite = [np.isfinite(out["grad_norm"]) for _, out, _ in records]
    assert all(finite) if policy == "mixed_bfloat16" else not finite[0]
