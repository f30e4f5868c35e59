"""The run layer (e2rnas_tf.runs): atomic files, the workdir identity rule,
metrics.jsonl on resume, and the Run context."""

import json
import os
import signal
import time

import pytest

from e2rnas_tf import config_lib
from e2rnas_tf.runs import context, files, metrics
from e2rnas_tf.runs import workdir as workdir_lib


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    path = tmp_path / "report.json"
    files.write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    files.write_text(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["report.json"]
    assert files.read_json(tmp_path / "missing.json", default={}) == {}
    path.write_text("{cut")
    with pytest.raises(ValueError):
        files.read_json(path)


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    files.write_text(path, "old")

    def crash(*args):
        raise KeyboardInterrupt("killed while renaming")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        files.write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def _read(path):
    return json.loads(open(path).read())


def _claim(directory, identity, overwrite=False):
    return workdir_lib.claim(str(directory), identity, record="config.json",
                             read=_read, outputs=("metrics.jsonl", "tb"),
                             overwrite=overwrite)


def test_one_identity_rule(tmp_path):
    run = tmp_path / "run"
    identity = {"epochs": 3, "model": {"layers": 5}}
    # Fresh (missing or empty) directories.
    assert _claim(run, identity) == workdir_lib.Claim(resume=False)
    run.mkdir()
    assert _claim(run, identity) == workdir_lib.Claim(resume=False)
    # The same run resumes (tuples and lists alike after JSON).
    (run / "config.json").write_text(json.dumps(identity))
    (run / "metrics.jsonl").write_text("")
    assert _claim(run, dict(identity, model={"layers": 5})).resume
    # Another run is refused with its differences, or cleared with
    # --overwrite.
    with pytest.raises(workdir_lib.WorkdirError) as error:
        _claim(run, {"epochs": 4, "model": {"layers": 5, "extra": 1}})
    assert str(error.value) == (
        f"{run} holds another run (epochs: 3 there, 4 here; model.extra: "
        "absent there); pass --overwrite to replace it or choose another "
        "--workdir")
    # A run of another kind: the first differences, and how many more.
    with pytest.raises(workdir_lib.WorkdirError) as error:
        _claim(run, {f"f{i}": i for i in range(6)})
    assert str(error.value) == (
        f"{run} holds another run (epochs: absent here; f0: absent there; "
        "f1: absent there; f2: absent there; and 4 more differences); pass "
        "--overwrite to replace it or choose another --workdir")
    claim = _claim(run, {"epochs": 4}, overwrite=True)
    assert not claim.resume
    assert set(claim.stale) == {"config.json", "metrics.jsonl"}
    workdir_lib.clear(str(run), claim.stale)
    assert os.listdir(run) == []
    # Outputs without a record, an unreadable record, a file.
    (run / "tb").mkdir()
    with pytest.raises(workdir_lib.WorkdirError, match="no config.json"):
        _claim(run, identity)
    (run / "config.json").write_text("{cut")
    with pytest.raises(workdir_lib.WorkdirError,
                       match="config.json exists and is not readable"):
        _claim(run, identity)
    assert _claim(run, identity, overwrite=True).stale
    (tmp_path / "afile").write_text("x")
    with pytest.raises(workdir_lib.WorkdirError, match="not a directory"):
        _claim(tmp_path / "afile", identity)


def test_non_identity_fields_do_not_make_another_run():
    config = config_lib.train_config().to_dict()
    changed = dict(config, log_every=1, checkpoint_every=5,
                   profile_steps="1,2", evaluate={"epsilons": [4.0]})
    assert workdir_lib.run_identity(config) == \
        workdir_lib.run_identity(changed)
    assert workdir_lib.run_identity(config) != \
        workdir_lib.run_identity(dict(config, epochs=1))


def test_metrics_log_appends_and_cuts_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = metrics.MetricsLog(path)
    for step in range(1, 5):
        log.write({"step": step})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # cut short by a kill
    log = metrics.MetricsLog(path, keep=lambda r: r["step"] <= 2)
    log.write({"step": 3, "again": True})
    log.close()
    assert metrics.read(path) == [{"step": 1}, {"step": 2},
                                  {"step": 3, "again": True}]
    # Without keep: a new file.
    metrics.MetricsLog(path).close()
    assert path.read_text() == ""


def _run_config(**fields):
    c = config_lib.train_config()
    c.update(fields)
    return c


def test_run_context_owns_the_directory(tmp_path):
    run_dir = tmp_path / "run"
    with context.Run(str(run_dir), _run_config()) as run:
        run.open()
        # The lock keeps a second process (or a second run) out.
        with pytest.raises(workdir_lib.WorkdirBusyError):
            workdir_lib.WorkdirLock(str(run_dir)).acquire()
        run.metrics.write({"step": 1})
        run.scalars(1, {"loss": 2.0}, prefix="train/")
        assert [run.count_skip(s) for s in (1, 1, 0, 1)] == [1, 2, 0, 1]
        assert run.skip_limit == 10
        assert run.stop_requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert run.stop_requested == "SIGTERM"
    assert metrics.read(run_dir / "metrics.jsonl") == [{"step": 1}]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert not (run_dir / workdir_lib.WorkdirLock.FILENAME).exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert context.EXIT_CODES == {"SIGTERM": 0, "SIGINT": 130}


def test_a_killed_writers_temporary_files_are_removed_on_open(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "genotypes").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    dead = [run_dir / ".tmp-999999-model_best.keras",
            run_dir / ".config.json.tmp-999999",
            run_dir / "genotypes" / "epoch_001.json.tmp-999999"]
    kept = [run_dir / "genotype.json", run_dir / "model.tmp-x",
            run_dir / f".summary.json.tmp-{os.getpid()}",
            run_dir / "checkpoints" / ".checkpoint_ok.json.tmp-999999"]
    for path in dead + kept:
        path.write_text("x")
    with context.Run(str(run_dir), _run_config()) as run:
        run.open()
    assert [p.exists() for p in dead] == [False] * 3
    assert [p.exists() for p in kept] == [True] * 4


def test_a_non_chief_scratch_directory_is_removed(tmp_path):
    scratch = tmp_path / "scratch"
    with context.Run(str(scratch), _run_config(), scratch=True) as run:
        run.open()
        assert scratch.is_dir()
    assert not scratch.exists()


def test_profiled_steps_are_traced_with_their_numbers(tmp_path):
    run_dir = tmp_path / "run"
    with context.Run(str(run_dir), _run_config(profile_steps="1,3")) as run:
        run.open()
        for step in range(4):
            with run.trace(step) as marker:
                # Steps 1 and 2 run inside a profiler step marker.
                assert (marker is not None) == (1 <= step < 3), step
    traces = list((run_dir / "tb" / "plugins" / "profile").glob("*/*"))
    assert traces, os.listdir(run_dir / "tb")
