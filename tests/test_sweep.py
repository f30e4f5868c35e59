"""`e2rnas sweep`: the Pareto front and the export of its models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from e2rnas_tf.experiments import pipeline, sweep
from e2rnas_tf.runs import workdir as workdir_lib
from tests.conftest import REPO


def _dominated_bruteforce(points):
    """Reference: i is dominated if some j is no worse in all three and
    strictly better in one (params smaller is better)."""
    out = []
    for i, (p, c, r) in enumerate(points):
        dominated = False
        for j, (q, d, s) in enumerate(points):
            if j == i:
                continue
            if q <= p and d >= c and s >= r and (q < p or d > c or s > r):
                dominated = True
        out.append(dominated)
    return out


def test_pareto_mask_hand_cases():
    # Larger and less accurate than point 0: dominated.
    assert sweep.pareto_mask([1, 2], [0.9, 0.8], [0.5, 0.4]) == [True, False]
    # A trade-off: both stay.
    assert sweep.pareto_mask([1, 2], [0.8, 0.9], [0.5, 0.5]) == [True, True]
    # Equal points do not dominate each other.
    assert sweep.pareto_mask([1, 1], [0.5, 0.5], [0.2, 0.2]) == [True, True]
    # Better robust accuracy alone keeps a larger network on the front.
    assert sweep.pareto_mask([1, 2], [0.9, 0.9], [0.1, 0.3]) == [True, True]
    assert sweep.pareto_mask([3.0], [0.1], [0.0]) == [True]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_mask_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    # Coarse values so that ties occur.
    pts = rng.integers(0, 4, size=(12, 3)).astype(float)
    mask = sweep.pareto_mask(pts[:, 0], pts[:, 1], pts[:, 2])
    assert mask == [not d for d in _dominated_bruteforce(pts.tolist())]
    assert any(mask)


def test_pareto_mask_refuses_ragged_input():
    with pytest.raises(ValueError, match="equal-length"):
        sweep.pareto_mask([1, 2], [0.5], [0.1, 0.2])


def _tiny(**overrides):
    from configs import sweep as sweep_config

    c = sweep_config.get_config("tiny")
    with c.unlocked():
        for key, value in overrides.items():
            c[key] = value
    return c


@pytest.mark.parametrize("overrides, match", [
    ({"targets": ()}, "config.targets"),
    ({"targets": (1.0, 1.0)}, "config.targets"),
    ({"targets": (-1.0,)}, "config.targets"),
    ({"resource": "latency"}, "config.resource"),
    ({"constraint": "none"}, "config.constraint"),
    ({"objective_sets": (("acc", "adv"),)}, "config.objective_sets"),
    ({"model_name": "bad/name"}, "name"),
])
def test_bad_sweep_configs_are_refused(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        sweep.sweep(_tiny(**overrides), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_front_waits_for_another_writer_then_refuses(tmp_path,
                                                     monkeypatch):
    # The settings (fakes here) run while another process holds the
    # workdir; the front, its exports and tables wait for its lock and are
    # refused after the wait, nothing written.
    ran = []

    def fake(search_cfg, train_cfg, run_dir, **kwargs):
        ran.append(os.path.basename(run_dir))
        return {"search": {"genotype": {}, "genotype_path": "g.json",
                           "genotype_params_m": 2.0},
                "train": {"params": 1e5, "macs": 2e7,
                          "model_path": "m.keras"},
                "evaluation": {"clean_accuracy": 0.5,
                               "robust_accuracy": {"pgd": {"2": 0.25}}},
                "seconds": 1.0}

    monkeypatch.setattr(pipeline, "search_train_evaluate", fake)
    monkeypatch.setattr(pipeline, "RESULTS_WAIT_SECONDS", 0.3)
    c = _tiny()
    with workdir_lib.WorkdirLock(str(tmp_path)):
        with pytest.raises(workdir_lib.WorkdirBusyError,
                           match="in use by another e2rnas process"):
            sweep.sweep(c, str(tmp_path), log=lambda *a: None)
    assert ran == [name for name, _, _ in sweep.settings(c)]
    assert sorted(os.listdir(tmp_path)) == []


def test_settings_cover_targets_times_objective_sets():
    c = _tiny(objective_sets=(("acc", "params"), ("acc", "adv", "params")),
              targets=(1.0, 2.5))
    names = [name for name, _, _ in sweep.settings(c)]
    assert names == ["params1_acc-params", "params2.5_acc-params",
                     "params1_acc-adv-params", "params2.5_acc-adv-params"]
    search, train = sweep.setting_configs(c, ("acc", "params"), 2.5)
    assert search.resource.params_target == 2.5
    assert search.resource.params_constraint == c.constraint
    assert tuple(search.objectives) == ("acc", "params")
    assert search.seed == train.seed == c.seed


def _front_point(tmp_path, name, params_m, clean, robust, pareto=True,
                 class_names=None):
    """A sweep point whose model is a tiny saved DerivedNetwork."""
    import keras

    from e2rnas_tf.space import model as model_lib

    run = tmp_path / "runs" / name / "train"
    run.mkdir(parents=True)
    net = model_lib.DerivedNetwork("DARTS_V2", channels=2, layers=3,
                                   num_classes=3)
    net.build((None, 8, 8, 3))
    net.save(str(run / "model_last.keras"))
    keras.backend.clear_session()
    if class_names:
        (run / "summary.json").write_text(json.dumps(
            {"class_names": class_names}))
    return {"name": name, "objectives": ["acc"], "target": 1.0,
            "params_m": params_m, "macs_m": 1.0, "clean": clean,
            "robust": robust, "robust_accuracy": {}, "search_params_m": 1.0,
            "genotype": net.genotype.to_dict(), "pareto": pareto,
            "model_path": str(run / "model_last.keras")}


def test_export_front_serves_every_version_with_labels(tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    names = ["cat", "dog", "ship"]
    points = [
        _front_point(tmp_path, "big", 3.0, 0.7, 0.2, class_names=names),
        _front_point(tmp_path, "small", 1.0, 0.5, 0.3, class_names=names),
        _front_point(tmp_path, "mid", 2.0, 0.6, 0.1, pareto=False),
    ]
    serving = tmp_path / "serving"
    exports_path = str(tmp_path / "exports.json")

    def config():
        parsed = text_format.Parse(
            (serving / "models.config").read_text(),
            model_server_config_pb2.ModelServerConfig())
        (entry,) = parsed.model_config_list.config
        return entry

    exports = sweep.export_front(points, str(serving), "front", exports_path,
                                 log=lambda *a: None)
    assert {k: os.path.basename(v) for k, v in exports.items()} == {
        "small": "1", "big": "2"}
    entry = config()
    assert entry.name == "front" and entry.base_path == "/models/front"
    assert list(entry.model_version_policy.specific.versions) == [1, 2]
    assert dict(entry.version_labels) == {
        "smallest": 1, "most_robust": 1, "most_accurate": 2}
    meta = json.loads((serving / "front" / "1" / "assets.extra" /
                       "e2rnas_metadata.json").read_text())
    assert meta["class_names"] == names

    # Again, with a new point that is more robust: only it is exported,
    # and the label moves to it.
    points.append(_front_point(tmp_path, "robust", 4.0, 0.4, 0.9))
    exports = sweep.export_front(points, str(serving), "front", exports_path,
                                 log=lambda *a: None)
    assert os.path.basename(exports["robust"]) == "3"
    assert sorted(os.listdir(serving / "front")) == ["1", "2", "3"]
    entry = config()
    assert list(entry.model_version_policy.specific.versions) == [1, 2, 3]
    assert dict(entry.version_labels) == {
        "smallest": 1, "most_robust": 3, "most_accurate": 2}


def _cli(args, env):
    return subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", *args], cwd=str(REPO), env=env,
        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_sweep_tiny_end_to_end(tmp_path, subprocess_env):
    workdir = str(tmp_path / "sweep")
    serving = str(tmp_path / "serving")
    args = ["sweep", "--config=configs/sweep.py:tiny", f"--workdir={workdir}",
            f"--export_base={serving}", "--model_name=front",
            "--config.targets=(0.005, 0.02, 0.05)"]
    proc = _cli(args, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = os.path.join(workdir, "results")
    with open(os.path.join(results, "sweep.json")) as f:
        points = json.load(f)["points"]
    assert [p["name"] for p in points] == [
        "params0.005_acc-adv-params", "params0.02_acc-adv-params",
        "params0.05_acc-adv-params"]
    # Figures from the runs' own files; the front recomputed by brute force.
    triples = []
    for p in points:
        run = os.path.join(workdir, "runs", p["name"])
        with open(os.path.join(run, "evaluation", "evaluation.json")) as f:
            ev = json.load(f)
        with open(os.path.join(run, "search", "config.json")) as f:
            assert json.load(f)["resource"]["params_target"] == p["target"]
        assert p["clean"] == ev["clean_accuracy"]
        assert p["robust"] == ev["robust_accuracy"]["pgd"]["2"]
        triples.append((p["params_m"], p["clean"], p["robust"]))
    front = [not d for d in _dominated_bruteforce(triples)]
    assert [p["pareto"] for p in points] == front
    # One served version per Pareto point, by increasing size, with the
    # point's figures in its metadata; models.config serves the model.
    served = sorted(os.listdir(os.path.join(serving, "front")), key=int)
    on_front = sorted((p for p in points if p["pareto"]),
                      key=lambda p: p["params_m"])
    assert served == [str(k + 1) for k in range(len(on_front))]
    for version, p in zip(served, on_front):
        vdir = os.path.join(serving, "front", version)
        assert os.path.isfile(os.path.join(vdir, "saved_model.pb"))
        with open(os.path.join(vdir, "assets.extra",
                               "e2rnas_metadata.json")) as f:
            meta = json.load(f)
        assert meta["sweep"]["name"] == p["name"]
        assert meta["sweep"]["clean"] == p["clean"]
        assert meta["sweep"]["robust"] == p["robust"]
        assert meta["pareto_optimal"] is True
        assert p["version"] == version
    for p in points:
        if not p["pareto"]:
            assert p["version"] is None
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2
    config = text_format.Parse(
        open(os.path.join(serving, "models.config")).read(),
        model_server_config_pb2.ModelServerConfig())
    (entry,) = config.model_config_list.config
    assert entry.name == "front"
    # Every front version is served, and the extremes are labelled.
    assert list(entry.model_version_policy.specific.versions) == [
        int(v) for v in served]
    assert set(entry.version_labels) == set(sweep.FRONT_LABELS)
    assert entry.version_labels["smallest"] == 1
    md = open(os.path.join(results, "sweep.md")).read()
    assert md.count("| params0.") == 3
    assert md.count(" * |") == sum(front)
    for name in ("pareto.png", "pareto.svg"):
        assert os.path.getsize(os.path.join(results, name)) > 1000
    for p in points:
        assert os.path.isfile(os.path.join(results, "cells",
                                           f"{p['name']}_normal.png"))

    # Again: nothing rerun, nothing exported twice.
    proc = _cli(args, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reusing its result") == 9
    assert sorted(os.listdir(os.path.join(serving, "front")), key=int) \
        == served
