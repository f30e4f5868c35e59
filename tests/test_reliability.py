"""Reliability: complete checkpoints, resume, preemption, faults.

Unit tests of `e2rnas_tf.runs.checkpoints` on tiny Keras models, then runs of
``e2rnas train`` / ``e2rnas search`` as real subprocesses that are sent
SIGTERM or SIGKILL and resumed; with ``config.deterministic`` the resumed
run must end bit-identical to an uninterrupted one.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf import config_lib
from e2rnas_tf import data as data_lib
from e2rnas_tf.runs import checkpoints as checkpointing
from e2rnas_tf.runs import context as run_context
from e2rnas_tf.space.search_space import SearchNetwork
from e2rnas_tf.training import train as train_lib
from tests.search_util import tiny_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
_BATCHES = data_lib.batches


# ---------------------------------------------------------------------------
# RunCheckpoint units.


def _dense_model(seed=0, width=4):
    keras.utils.set_random_seed(seed)
    # Explicit names: auto-numbered ones differ between models of one
    # process, as they would not between two processes.
    return keras.Sequential([keras.Input((3,)),
                             keras.layers.Dense(width, name="d1"),
                             keras.layers.BatchNormalization(name="bn"),
                             keras.layers.Dense(2, name="d2")], name="net")


def _fit_steps(model, optimizer, steps, seed=1):
    x = tf.random.stateless_normal([8, 3], seed=[seed, 0])
    y = tf.random.stateless_normal([8, 2], seed=[seed, 1])
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)


def _state(model, optimizer):
    return [np.array(v) for v in list(model.weights) + optimizer.variables]


def _make_ckpt(directory, model, optimizer, step, **kwargs):
    return checkpointing.RunCheckpoint(
        directory, {"model": checkpointing.variables_by_path(model),
                    "optimizer": checkpointing.numbered_variables(optimizer),
                    "step": step}, **kwargs)


@pytest.mark.parametrize("make_optimizer", [
    lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    lambda: keras.optimizers.Adam(0.01),
], ids=["sgd_momentum", "adam"])
def test_optimizer_slots_round_trip(tmp_path, make_optimizer):
    """Momentum / Adam moments come back, so the next step is identical."""
    model, opt = _dense_model(), make_optimizer()
    opt.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    _fit_steps(model, opt, 3)
    step.assign(3)
    slots = [np.array(v) for v in opt.variables[2:]]
    assert all(np.any(s != 0) for s in slots)  # really non-trivial slots
    ckpt = _make_ckpt(tmp_path, model, opt, step)
    ckpt.save(3)

    # A fresh model and optimizer (other auto-numbered optimizer names).
    other, other_opt = _dense_model(seed=5), make_optimizer()
    other_opt.build(other.trainable_variables)
    other_step = tf.Variable(0, dtype=tf.int64)
    restored = _make_ckpt(tmp_path, other, other_opt, other_step).restore()
    assert restored == str(tmp_path / "ckpt-3")
    assert int(other_step.numpy()) == 3
    for a, b in zip(_state(model, opt), _state(other, other_opt)):
        np.testing.assert_array_equal(a, b)
    _fit_steps(model, opt, 1, seed=2)
    _fit_steps(other, other_opt, 1, seed=2)
    for a, b in zip(_state(model, opt), _state(other, other_opt)):
        np.testing.assert_array_equal(a, b)


def test_variables_by_path_covers_the_supernet_cells(tmp_path):
    net = SearchNetwork(channels=4, num_classes=10, layers=3, steps=2,
                        multiplier=2,
                        primitives=["none", "skip_connect", "sep_conv_3x3"])
    net.build((None, 8, 8, 3))
    flat = checkpointing.variables_by_path(net)
    assert len(flat) == len(net.weights)
    assert any("cell" in path for path in flat)
    # What tf.train.Checkpoint(network=net) would miss (the reason for
    # the flat dict): most variables.
    prefix = tf.train.Checkpoint(network=net).write(str(tmp_path / "net"))
    names = [n for n, _ in tf.train.list_variables(prefix)
             if n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert len(names) < len(flat) / 2


def test_keeps_the_last_k_and_lists_only_verified(tmp_path):
    model, opt = _dense_model(), keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = _make_ckpt(tmp_path, model, opt, step, max_to_keep=2)
    for s in (1, 2, 3):
        step.assign(s)
        ckpt.save(s)
    assert [e["step"] for e in ckpt.checkpoints()] == [2, 3]
    assert not list(tmp_path.glob("ckpt-1.*"))
    assert ckpt.latest == str(tmp_path / "ckpt-3")


def test_a_crash_before_the_manifest_keeps_the_previous(tmp_path,
                                                        monkeypatch):
    """Files written but the manifest not yet renamed: not listed."""
    model, opt = _dense_model(), keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(model.trainable_variables)
    step = tf.Variable(1, dtype=tf.int64)
    ckpt = _make_ckpt(tmp_path, model, opt, step)
    ckpt.save(1)

    def crash(path, value, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpointing.files_lib, "write_json", crash)
    step.assign(2)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2)
    monkeypatch.undo()
    assert list(tmp_path.glob("ckpt-2.index"))  # the files are there...
    assert ckpt.latest == str(tmp_path / "ckpt-1")  # ...but not listed
    step.assign(0)
    assert _make_ckpt(tmp_path, model, opt, step).restore().endswith("ckpt-1")
    assert int(step.numpy()) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_latest_falls_back_with_a_warning(tmp_path, damage):
    model, opt = _dense_model(), keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = _make_ckpt(tmp_path, model, opt, step)
    step.assign(1)
    ckpt.save(1)
    good = _state(model, opt)
    _fit_steps(model, opt, 2)
    step.assign(2)
    ckpt.save(2)
    data = next(tmp_path.glob("ckpt-2.data-*"))
    raw = data.read_bytes()
    if damage == "truncate":
        data.write_bytes(raw[:len(raw) // 2])
    elif damage == "flip":
        data.write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    else:
        data.unlink()
    warnings = []
    restored = _make_ckpt(tmp_path, model, opt, step,
                          log=warnings.append).restore()
    assert restored.endswith("ckpt-1") and int(step.numpy()) == 1
    assert len(warnings) == 1 and "ckpt-2" in warnings[0]
    for a, b in zip(good, _state(model, opt)):
        np.testing.assert_array_equal(a, b)
    # Nothing intact at all: an error, not a silent fresh start.
    for path in tmp_path.glob("ckpt-1.data-*"):
        path.write_bytes(b"")
    with pytest.raises(checkpointing.CheckpointError, match="no intact"):
        _make_ckpt(tmp_path, model, opt, step, log=warnings.append).restore()


def test_another_configuration_is_refused(tmp_path):
    model, opt = _dense_model(), keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    _make_ckpt(tmp_path, model, opt, step,
               fingerprint={"model": {"layers": 8}, "objectives": ["acc"]}
               ).save(0)
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"model\.layers: checkpoint 8, now 5"):
        _make_ckpt(tmp_path, model, opt, step,
                   fingerprint={"model": {"layers": 5},
                                "objectives": ["acc"]}).restore()
    # Same fingerprint, other shapes: the variable is named.
    wide = _dense_model(width=6)
    wide_opt = keras.optimizers.SGD(0.1, momentum=0.9)
    wide_opt.build(wide.trainable_variables)
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"variable model/net/bn/beta has shape "
                             r"\[4\] there, \[6\] here"):
        _make_ckpt(tmp_path, wide, wide_opt, step,
                   fingerprint={"model": {"layers": 8},
                                "objectives": ["acc"]}).restore()


def test_preemption_guard_turns_signals_into_a_flag():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM,
                                                 signal.SIGINT)}
    with run_context.PreemptionGuard() as guard:
        assert guard.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert guard.requested == "SIGTERM"
    with run_context.PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert guard.requested == "SIGINT"
        # A second Ctrl-C does not wait for the step boundary.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert {s: signal.getsignal(s) for s in previous} == previous


# ---------------------------------------------------------------------------
# Non-finite training steps.


def _tiny_train_config(**kw):
    c = config_lib.train_config()
    c.genotype = "DARTS_V2"
    c.data.update(image_size=8, num_train=48, num_test=10, cutout=0)
    c.model.update(layers=3, channels=4, drop_path=0.0)
    c.batch_size = 16
    c.eval_batch_size = 16
    c.epochs = 2
    c.steps_per_epoch = 3
    c.deterministic = True
    c.max_consecutive_skips = 2
    c.update(kw)
    return c


def _poison(monkeypatch, bad):
    """Makes the training batches ``bad(epoch, index)`` all-NaN."""
    batches = _BATCHES

    def poisoned(data, batch_size, *, epoch, training, **kwargs):
        ds = batches(data, batch_size, epoch=epoch, training=training,
                     **kwargs)
        if not training:
            return ds
        first = int(kwargs.get("skip_batches", 0))
        flags = tf.constant([bool(bad(epoch, first + i)) for i in range(64)])

        def apply(i, batch):
            images, labels = batch
            nan = tf.fill(tf.shape(images), float("nan"))
            return tf.where(flags[i], nan, images), labels

        return ds.enumerate().map(apply)

    monkeypatch.setattr(train_lib.data_lib, "batches", poisoned)


def test_train_skips_a_nan_batch_and_stops_after_consecutive(tmp_path,
                                                             monkeypatch,
                                                             capsys):
    config = _tiny_train_config()
    # Epoch 2 (steps 4-6): batches 2 and 3 are NaN; max 2 in a row.
    _poison(monkeypatch, lambda epoch, i: epoch == 1 and i >= 1)
    workdir = tmp_path / "run"
    with pytest.raises(train_lib.TrainingDiverged, match="2 consecutive"):
        train_lib.train(config, str(workdir))
    out = capsys.readouterr().out
    assert "step 5 skipped: non-finite loss nan" in out
    assert "step 6 skipped" in out and "(2 in a row)" in out
    # The checkpoint left is good: finite, and equal to the weights after
    # the last applied step (step 4: the skipped steps changed nothing).
    manifest = json.loads((workdir / "checkpoints" /
                           checkpointing.MANIFEST).read_text())
    assert manifest["checkpoints"][-1]["step"] == 6
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints" / "ckpt-6"))
    after_epoch = tf.train.load_checkpoint(str(workdir / "checkpoints" /
                                               "ckpt-3"))
    names = [n for n in reader.get_variable_to_shape_map()
             if n.startswith("model/")]
    assert len(names) > 50
    changed = 0
    for name in names:
        value = reader.get_tensor(name)
        assert np.all(np.isfinite(value)), name
        changed += not np.array_equal(value, after_epoch.get_tensor(name))
    assert changed > 0  # step 4 (good) was applied

    # One NaN batch alone is skipped and the run completes.
    _poison(monkeypatch, lambda epoch, i: epoch == 1 and i == 1)
    summary = train_lib.train(config, str(tmp_path / "one"))
    assert summary["steps"] == 6
    assert "step 5 skipped" in capsys.readouterr().out
    record = json.loads((tmp_path / "one" / "metrics.jsonl")
                        .read_text().splitlines()[-1])
    assert np.isfinite(record["train_loss"])


# ---------------------------------------------------------------------------
# Real subprocesses: SIGTERM and SIGKILL, then resume.

TRAIN_CONFIG = '''
from e2rnas_tf import config_lib


def get_config():
    c = config_lib.train_config()
    c.genotype = "DARTS_V2"
    c.data.image_size = 8
    c.data.num_train = 96
    c.data.num_test = 16
    c.data.cutout = 4
    c.model.layers = 3
    c.model.channels = 4
    c.model.drop_path = 0.0
    c.batch_size = 8
    c.eval_batch_size = 16
    c.epochs = 2
    c.steps_per_epoch = 10
    c.checkpoint_every = 1
    c.deterministic = True
    c.lock()
    return c
'''


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="2",
               PYTHONPATH=str(REPO))
    return env


def _command(kind, config_path, workdir):
    return [sys.executable, "-m", "e2rnas_tf", kind,
            f"--config={config_path}", f"--workdir={workdir}"]


def _run(command):
    return subprocess.run(command, capture_output=True, text=True,
                          env=_env(), cwd=str(REPO), timeout=600)


def _manifest_step(workdir):
    try:
        manifest = json.loads((pathlib.Path(workdir) / "checkpoints" /
                               checkpointing.MANIFEST).read_text())
        return manifest["checkpoints"][-1]["step"]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _start_and_signal(command, workdir, sig, ready):
    """Starts ``command``, waits until ``ready(workdir)``, sends ``sig``."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=str(REPO))
    try:
        deadline = time.time() + 300
        while not ready(workdir):
            if proc.poll() is not None or time.time() > deadline:
                out, err = proc.communicate()
                pytest.fail(f"run ended before the signal: {err[-2000:]}")
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def _keras_weights(path):
    model = keras.models.load_model(path)
    return {v.path: np.array(v) for v in model.weights}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_ref")
    config_path = root / "tiny.py"
    config_path.write_text(TRAIN_CONFIG)
    result = _run(_command("train", config_path, root / "full"))
    assert result.returncode == 0, result.stderr[-3000:]
    return config_path, _keras_weights(root / "full" / "model_last.keras")


def test_train_sigterm_saves_exits_0_and_resumes_identically(
        train_reference, tmp_path):
    config_path, reference = train_reference
    workdir = tmp_path / "run"
    command = _command("train", config_path, workdir)
    code, out, err = _start_and_signal(
        command, workdir, signal.SIGTERM,
        lambda w: (_manifest_step(w) or 0) >= 3)
    assert code == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    assert "Resume by running the same command again" in out
    stopped = _manifest_step(workdir)
    assert 3 <= stopped < 20, out
    assert not (workdir / "summary.json").exists()

    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at epoch" in result.stdout
    _assert_same_weights(reference,
                         _keras_weights(workdir / "model_last.keras"))
    records = [json.loads(line) for line in
               (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]


def _kill_point(when):
    """When to SIGKILL a run: "first_files" = while (or right after) its
    first checkpoint is written; "step_N" = once a checkpoint of step N
    or later is complete."""
    if when == "first_files":
        return lambda w: bool(list((pathlib.Path(w) / "checkpoints")
                                   .glob("ckpt-*")))
    target = int(when.split("_")[1])
    return lambda w: (_manifest_step(w) or 0) >= target


# Killed during the first checkpoint write stays in the default suite (a
# fast representative); later kills are slow.
@pytest.mark.parametrize("when", [
    "first_files", pytest.param("step_7", marks=pytest.mark.slow),
    pytest.param("step_14", marks=pytest.mark.slow)])
def test_train_sigkill_then_resume_is_identical(train_reference, tmp_path,
                                                when):
    config_path, reference = train_reference
    workdir = tmp_path / "run"
    command = _command("train", config_path, workdir)
    code, _, _ = _start_and_signal(command, workdir, signal.SIGKILL,
                                   _kill_point(when))
    assert code == -signal.SIGKILL
    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_weights(reference,
                         _keras_weights(workdir / "model_last.keras"))


# ---------------------------------------------------------------------------
# The search run.

SEARCH_FLAGS = tiny_flags(**{
    "data.num_train": 96, "data.num_test": 16, "epochs": 2,
    "steps_per_epoch": 5, "checkpoint_every": 1, "deterministic": True,
    "objectives": ("acc", "params"), "arch.lr": 0.01})


def _search_command(workdir):
    return [sys.executable, "-m", "e2rnas_tf", "search",
            "--config=configs/search_demo.py", f"--workdir={workdir}",
            *SEARCH_FLAGS]


def _final_state(workdir):
    """Every tensor of the last checkpoint, and the genotype."""
    workdir = pathlib.Path(workdir)
    manifest = json.loads((workdir / "checkpoints" /
                           checkpointing.MANIFEST).read_text())
    prefix = workdir / "checkpoints" / manifest["checkpoints"][-1]["prefix"]
    reader = tf.train.load_checkpoint(str(prefix))
    tensors = {n: reader.get_tensor(n)
               for n in reader.get_variable_to_shape_map()
               if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    return tensors, (workdir / "genotype.json").read_text()


def _assert_same_search(a, b):
    tensors_a, genotype_a = a
    tensors_b, genotype_b = b
    assert genotype_a == genotype_b
    assert tensors_a.keys() == tensors_b.keys()
    # The cells are in the checkpoint (not only stem and classifier).
    assert sum("cell" in n for n in tensors_a) > 20
    assert sum("alpha" in n for n in tensors_a) == 2
    for name in tensors_a:
        np.testing.assert_array_equal(tensors_a[name], tensors_b[name],
                                      err_msg=name)


@pytest.fixture(scope="module")
def search_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("search_ref") / "full"
    result = _run(_search_command(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return _final_state(workdir)


@pytest.mark.slow
def test_search_sigterm_then_resume_is_identical(search_reference, tmp_path):
    workdir = tmp_path / "run"
    command = _search_command(workdir)
    code, out, err = _start_and_signal(
        command, workdir, signal.SIGTERM,
        lambda w: (_manifest_step(w) or 0) >= 2)
    assert code == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    assert "Resume by running the same command again" in out
    assert 2 <= _manifest_step(workdir) < 10
    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    _assert_same_search(search_reference, _final_state(workdir))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["first_files", "step_3", "step_7"])
def test_search_sigkill_then_resume_is_identical(search_reference, tmp_path,
                                                 when):
    workdir = tmp_path / "run"
    command = _search_command(workdir)
    code, _, _ = _start_and_signal(command, workdir, signal.SIGKILL,
                                   _kill_point(when))
    assert code == -signal.SIGKILL
    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_search(search_reference, _final_state(workdir))


def test_search_stops_after_consecutive_skips_with_a_good_checkpoint(
        tmp_path, monkeypatch):
    from e2rnas_tf.search import run as search_lib
    from e2rnas_tf.search import step as step_lib

    real = search_lib.data_lib.batches

    def late_nan_batches(data, batch_size, *, epoch, **kwargs):
        ds = real(data, batch_size, epoch=epoch, **kwargs)
        if epoch == 0:
            return ds
        return ds.map(lambda x, y: (x * np.float32(np.nan), y))

    monkeypatch.setattr(search_lib.data_lib, "batches", late_nan_batches)
    config = config_lib.search_config()
    config.model.update(layers=3, channels=4, steps=2, multiplier=2,
                        primitives=("none", "skip_connect", "sep_conv_3x3"))
    config.data.update(image_size=8, num_train=64, num_test=16)
    config.update(batch_size=8, eval_batch_size=16, epochs=2,
                  steps_per_epoch=2, objectives=("acc",),
                  max_consecutive_skips=2, deterministic=True)
    config.resource.update(layers=5, channels=8)
    logs = []
    with pytest.raises(step_lib.SearchDivergedError):
        search_lib.search(config, str(tmp_path), log=logs.append)
    assert any("last finite state saved" in line for line in logs)
    state, _ = _final_state_of(tmp_path, 4)
    after_epoch, _ = _final_state_of(tmp_path, 2)
    for name, value in state.items():
        assert np.all(np.isfinite(value)), name
        if name.startswith("network/"):
            # Both epoch-2 steps were skipped: nothing changed.
            np.testing.assert_array_equal(value, after_epoch[name],
                                          err_msg=name)


def _final_state_of(workdir, step):
    reader = tf.train.load_checkpoint(
        str(pathlib.Path(workdir) / "checkpoints" / f"ckpt-{step}"))
    return {n: reader.get_tensor(n)
            for n in reader.get_variable_to_shape_map()
            if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}, None


@pytest.mark.slow
def test_train_sigterm_resume_with_drop_path_is_identical(tmp_path):
    # Drop-path masks are stateless functions of (seed, step, replica).
    config_path = tmp_path / "drop_path.py"
    config_path.write_text(TRAIN_CONFIG.replace(
        "c.model.drop_path = 0.0", "c.model.drop_path = 0.3"))
    result = _run(_command("train", config_path, tmp_path / "full"))
    assert result.returncode == 0, result.stderr[-3000:]
    command = _command("train", config_path, tmp_path / "run")
    code, _, err = _start_and_signal(
        command, tmp_path / "run", signal.SIGTERM,
        lambda w: (_manifest_step(w) or 0) >= 3)
    assert code == 0, err[-3000:]
    assert _run(command).returncode == 0
    _assert_same_weights(
        _keras_weights(tmp_path / "full" / "model_last.keras"),
        _keras_weights(tmp_path / "run" / "model_last.keras"))
