"""tools/killpoints.py: its comparison of two workdirs (fast), and kills at
an epoch's end and during a checkpoint write resumed to identical files
(slow, real subprocesses)."""

import json
import pathlib
import random
import zipfile

import numpy as np
import pytest

from tests.tool_util import load_tool

killpoints = load_tool("killpoints")


def _workdir(root, *, loss=0.5, seconds=1.0, extra=None):
    root = pathlib.Path(root)
    (root / "genotypes").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    (root / "tb").mkdir()
    (root / "genotypes" / "epoch_001.json").write_text('{"normal": []}\n')
    (root / "config.json").write_text(json.dumps(
        {"workdir": str(root.resolve()), "epochs": 2}))
    (root / "metrics.jsonl").write_text(
        json.dumps({"kind": "step", "step": 1, "loss": loss}) + "\n"
        + json.dumps({"kind": "epoch", "epoch": 1,
                      "train_seconds": seconds}) + "\n")
    np.savez(root / "alpha_history.npz", alpha=np.arange(4.0))
    (root / "checkpoints" / "ckpt-1.index").write_bytes(
        bytes([int(seconds) % 256]))
    (root / "tb" / "events").write_bytes(str(seconds).encode())
    (root / ".e2rnas.lock").write_text(str(seconds))
    for name, text in (extra or {}).items():
        (root / name).write_text(text)
    return root


def test_same_results_compare_equal_despite_time_path_and_checkpoints(
        tmp_path):
    a = _workdir(tmp_path / "a", seconds=1.0)
    b = _workdir(tmp_path / "b", seconds=7.0)
    assert killpoints.compare_runs(a, b) == []


def test_a_differing_value_is_reported_with_its_field(tmp_path):
    a = _workdir(tmp_path / "a", loss=0.5)
    b = _workdir(tmp_path / "b", loss=0.25)
    assert killpoints.compare_runs(a, b) == [
        "metrics.jsonl: line 1 differs (loss)"]


def test_missing_lines_extra_files_and_damaged_bytes(tmp_path):
    a = _workdir(tmp_path / "a")
    b = _workdir(tmp_path / "b", extra={".x.tmp-123": "junk"})
    (b / "genotypes" / "epoch_001.json").unlink()
    lines = (b / "metrics.jsonl").read_text().splitlines()
    (b / "metrics.jsonl").write_text(lines[0] + "\n")
    data = (b / "alpha_history.npz").read_bytes()
    (b / "alpha_history.npz").write_bytes(data[:len(data) // 2])
    assert killpoints.compare_runs(a, b) == [
        "missing genotypes/epoch_001.json", "extra .x.tmp-123",
        "alpha_history.npz: bytes differ",
        "metrics.jsonl: 2 lines vs 1"]


def _keras_file(path, date, weights):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps(
            {"keras_version": "3", "date_saved": date}))
        archive.writestr("model.weights.h5", weights)


def test_keras_files_compare_member_by_member_without_the_save_date(
        tmp_path):
    a = _workdir(tmp_path / "a")
    b = _workdir(tmp_path / "b")
    _keras_file(a / "model_last.keras", "2026-12-02@00:05", b"w1")
    _keras_file(b / "model_last.keras", "2026-12-02@00:06", b"w1")
    assert killpoints.compare_runs(a, b) == []
    _keras_file(b / "model_last.keras", "2026-12-02@00:06", b"w2")
    assert killpoints.compare_runs(a, b) == [
        "model_last.keras: differ: model.weights.h5"]


def test_kill_points_cover_every_boundary_writes_and_random_instants():
    points = killpoints.kill_points("search", seconds=60.0, first_line=20.0,
                                    n_random=20, n_startup=2,
                                    rng=random.Random(0))
    labels = [p.label for p in points]
    assert labels[:6] == [f"boundary {s}" for s in range(1, 7)]
    assert labels[6:9] == ["mid-write 1", "mid-write 3", "mid-write 6"]
    startup = [p for p in points if p.kind == "start-up"]
    assert len(startup) == 2 and all(0.5 <= p.value <= 20.0 for p in startup)
    randoms = [p for p in points if p.kind == "random"]
    assert len(randoms) == 18
    assert all(0.0 <= p.value <= 1.0 and p.span == 40.0 for p in randoms)
    # A random kill waits for the run's own first metrics line.
    late = killpoints.KillPoint("random", 0.5, 40.0)
    assert not late.reached("nowhere", 100.0, None)
    assert not late.reached("nowhere", 39.0, 20.0)
    assert late.reached("nowhere", 40.0, 20.0)


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert killpoints.main(["--kind", "export"]) == 2
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "f").write_text("x")
    assert killpoints.main(["--workdir", str(tmp_path / "old")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "old" / "f").read_text() == "x"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["search", "train"])
def test_killed_at_an_epoch_end_or_mid_write_resumes_identically(
        tmp_path, kind):
    reference = tmp_path / "reference"
    killpoints.run_to_end(kind, reference)
    # Step 3 ends epoch 1: the kill lands in the epoch's end (its alpha
    # snapshot, genotype, evaluation, metrics line), the case that once
    # lost them.
    for i, point in enumerate([killpoints.KillPoint("boundary", 3),
                               killpoints.KillPoint("mid-write", 4)]):
        workdir = tmp_path / f"kill_{i}"
        step = killpoints.kill_at(kind, workdir, point)
        assert step is not None, f"{point.label}: finished before the kill"
        killpoints.run_to_end(kind, workdir)
        assert killpoints.compare_runs(reference, workdir) == [], point.label
