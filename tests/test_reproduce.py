"""`e2rnas reproduce` and the stage pipeline under it."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from e2rnas_tf import config_lib
from e2rnas_tf.experiments import pipeline, reproduce
from e2rnas_tf.runs import workdir as workdir_lib
from tests.conftest import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def _cli(args, env):
    return subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", *args], cwd=str(REPO), env=env,
        capture_output=True, text=True, timeout=900)


def _tiny(**overrides):
    from configs import reproduce as reproduce_config

    c = reproduce_config.get_config("tiny")
    with c.unlocked():
        for key, value in overrides.items():
            c[key] = value
    return c


# -- pure parts --------------------------------------------------------------

ROBUST = [["fgsm", "1"], ["fgsm", "2"], ["pgd", "1"], ["pgd", "2"]]


def test_summarize_is_mean_and_sample_sd_per_method():
    rng = np.random.default_rng(0)
    records = []
    for method in ("darts", "e2rnas"):
        for seed in range(3):
            r = {"method": method, "seed": seed, "robust_fields": ROBUST}
            for field, _, _ in reproduce.columns([r]):
                r[field] = float(rng.random())
            records.append(r)
    summary = reproduce.summarize(records, ("darts", "e2rnas"))
    assert set(summary["darts"]) == {
        "search_params_m", "params_m", "macs_m", "clean", "fgsm_1",
        "fgsm_2", "pgd_1", "pgd_2"}
    for method in ("darts", "e2rnas"):
        for field, _, _ in reproduce.columns(records):
            values = [r[field] for r in records if r["method"] == method]
            stat = summary[method][field]
            assert stat["n"] == 3
            assert stat["mean"] == pytest.approx(np.mean(values))
            assert stat["sd"] == pytest.approx(np.std(values, ddof=1))


def test_summarize_single_seed_has_no_spread():
    record = {"method": "darts", "seed": 0}
    record.update({f: 0.5 for f, _, _ in reproduce.BASE_COLUMNS})
    stat = reproduce.summarize([record], ("darts",))["darts"]["clean"]
    assert stat == {"mean": 0.5, "sd": None, "n": 1}


def _result():
    """A finished run's result as `pipeline.search_train_evaluate` gives
    it, evaluated at 1/255 and 2/255 as the authors' protocol."""
    return {
        "search": {"genotype": {"normal": [["skip_connect", 0]] * 8,
                                "reduce": [["max_pool_3x3", 0]] * 8,
                                "normal_concat": [2, 3, 4, 5],
                                "reduce_concat": [2, 3, 4, 5]}},
        "train": {"params": 1e5, "macs": 2e7, "num_classes": 10,
                  "image_size": 32},
        "evaluation": {"clean_accuracy": 0.5, "num_examples": 10,
                       "robust_accuracy": {
                           "pgd": {"2": 0.125, "1": 0.25},
                           "fgsm": {"1": 0.375, "2": 0.3125}}},
        "seconds": 36.0}


def test_table_has_a_column_per_evaluated_attack_and_eps():
    # The authors' protocol evaluates at 1/255 and 2/255: those are the
    # columns (a table fixed at 2/255 and 8/255 showed "-" for 8 and
    # dropped 1/255).
    records = [reproduce.run_record("darts", 0, _result())]
    assert [f for f, _, _ in reproduce.columns(records)][4:] == [
        "fgsm_1", "fgsm_2", "pgd_1", "pgd_2"]
    summary = reproduce.summarize(records, ("darts",))
    meta = {"variant": "cpu", "command": "c", "machine": "m", "hours": 0.01,
            "runs": 1, "data": "d", "finished": "f", "seeds": [0],
            "num_examples": 10, "image_size": 32, "train_scale": "s"}
    md = reproduce.format_results(records, summary, meta)
    assert ("| clean acc | FGSM 1/255 | FGSM 2/255 | PGD 1/255 | PGD 2/255 "
            "| hours |") in md
    assert "8/255" not in md
    assert "| darts s0 | " in md and \
        "| 0.5000 | 0.3750 | 0.3125 | 0.2500 | 0.1250 | 0.01 |" in md


@pytest.mark.parametrize("overrides, match", [
    ({"methods": ("darts", "nas")}, "config.methods"),
    ({"methods": ("darts", "darts")}, "config.methods"),
    ({"methods": ()}, "config.methods"),
    ({"seeds": (0, 0)}, "config.seeds"),
    ({"seeds": (-1,)}, "config.seeds"),
])
def test_bad_reproduce_configs_are_refused(overrides, match, tmp_path):
    with pytest.raises(reproduce.ReproduceError, match=match):
        reproduce.reproduce(_tiny(**overrides), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_robust_setting_must_be_evaluated(tmp_path):
    c = _tiny()
    with c.unlocked():
        c.robust.eps = 4.0
    with pytest.raises(reproduce.ReproduceError, match="config.robust"):
        reproduce.reproduce(c, str(tmp_path))


def test_method_configs_differ_only_in_the_upper_level():
    c = _tiny()
    with c.unlocked():
        c.data.name, c.data.root = "folder", "/data/cifar10"
    configs = {m: reproduce.method_configs(c, m, 3)
               for m in reproduce.METHODS}
    for search, train in configs.values():
        assert search.seed == train.seed == 3
        assert search.data.root == train.data.root == "/data/cifar10"
        assert search.data.image_size == c.search.data.image_size
        # Every method searches at the config's scale.
        assert search.model.to_dict() == c.search.model.to_dict()
        assert (search.batch_size, search.epochs) == (c.search.batch_size,
                                                      c.search.epochs)
        assert train.to_dict() == configs["darts"][1].to_dict()
    assert tuple(configs["darts"][0].objectives) == ("acc",)
    assert tuple(configs["e2rnas"][0].objectives) == ("acc", "adv", "params")
    assert configs["e2rnas"][0].combine.method == "mgda"
    assert configs["equal"][0].combine.method == "sum"
    # Apart from objectives/combine, these three searches are the same.
    def rest(cfg, *fields):
        d = cfg.to_dict()
        for field in ("objectives", "combine") + fields:
            d.pop(field)
        return d
    assert rest(configs["darts"][0]) == rest(configs["e2rnas"][0]) \
        == rest(configs["equal"][0])
    # The authors' runs: their algorithm, our scale.
    published, nomgda = configs["published"][0], configs["nomgda"][0]
    assert tuple(published.objectives) == ("acc", "adv", "params", "ood",
                                           "flops")
    assert published.arch.order == "second"
    assert published.combine.apply_to == "raw"
    assert published.resource.cost_model == "authors"
    assert (published.resource.layers, published.resource.channels) == (8, 16)
    assert published.resource.params_target == 4.0
    assert published.attack.gradient_at == "clean"
    assert nomgda.combine.method == "ones"
    assert rest(published) == rest(nomgda)
    assert published.combine.method == "mgda"
    v1 = configs["v1"][0]
    assert tuple(v1.objectives) == ("acc", "params")
    assert v1.adv_train.enabled and v1.resource.cost_model == "authors_v1"
    assert "authors_v1" in reproduce.describe_method(v1)


def test_run_stage_reuses_refuses_and_overwrites(tmp_path):
    calls = []
    cfg = ml_collections.ConfigDict({"a": 1})

    def fn():
        calls.append(1)
        return {"value": len(calls)}

    d = str(tmp_path / "stage")
    os.makedirs(d)
    assert pipeline.run_stage(d, cfg, fn, log=lambda *a: None) == {"value": 1}
    assert pipeline.run_stage(d, cfg, fn, log=lambda *a: None) == {"value": 1}
    assert len(calls) == 1
    other = ml_collections.ConfigDict({"a": 2})
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"holds another finished stage \(a: 1 there, 2 "
                             r"here\); pass --overwrite"):
        pipeline.run_stage(d, other, fn, log=lambda *a: None)
    assert len(calls) == 1
    with open(os.path.join(d, "stage.json")) as f:
        assert json.load(f)["config"] == {"a": 1}   # untouched
    assert pipeline.run_stage(d, other, fn, overwrite=True,
                              log=lambda *a: None) == {"value": 2}


def test_a_failing_stage_leaves_no_marker(tmp_path):
    def fn():
        raise ValueError("boom")

    d = str(tmp_path)
    with pytest.raises(ValueError, match="boom"):
        pipeline.run_stage(d, ml_collections.ConfigDict({"a": 1}), fn)
    assert not os.path.exists(os.path.join(d, "stage.json"))


# -- end to end --------------------------------------------------------------

def _eval_json(workdir, run):
    with open(os.path.join(workdir, "runs", run, "evaluation",
                           "evaluation.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_reproduce_tiny_end_to_end_and_resume(tmp_path, subprocess_env):
    workdir = str(tmp_path / "repro")
    args = ["reproduce", "--config=configs/reproduce.py:tiny",
            f"--workdir={workdir}"]
    proc = _cli(args, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = os.path.join(workdir, "results")
    with open(os.path.join(results, "results.json")) as f:
        out = json.load(f)
    runs = [f"{m}_s{s}" for m in ("darts", "e2rnas", "equal")
            for s in (0, 1)]
    assert [r["name"].replace(" ", "_") for r in out["runs"]] == runs
    # The table's figures are the evaluation files' figures.
    for r in out["runs"]:
        ev = _eval_json(workdir, r["name"].replace(" ", "_"))
        assert r["clean"] == ev["clean_accuracy"]
        for attack in ("fgsm", "pgd"):
            for eps in ("2", "8"):
                assert r[f"{attack}_{eps}"] == \
                    ev["robust_accuracy"][attack][eps]
        assert r["params_m"] * 1e6 == pytest.approx(ev["params"])
        assert ev["num_examples"] == 16
        # Seeds 0 and 1 are evaluated on the same images (seed 0).
        assert ev["seed"] == 0
    for method in ("darts", "e2rnas", "equal"):
        clean = [r["clean"] for r in out["runs"] if r["method"] == method]
        stat = out["summary"][method]["clean"]
        assert stat["mean"] == pytest.approx(np.mean(clean))
        assert stat["sd"] == pytest.approx(np.std(clean, ddof=1))
    # The three searches used their own upper levels.
    def search_config(run):
        with open(os.path.join(workdir, "runs", run, "search",
                               "config.json")) as f:
            return json.load(f)
    assert search_config("darts_s0")["objectives"] == ["acc"]
    assert search_config("e2rnas_s1")["combine"]["method"] == "mgda"
    assert search_config("equal_s0")["combine"]["method"] == "sum"
    with open(os.path.join(workdir, "runs", "equal_s0", "search",
                           "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"weight/acc"' in line]
    assert steps and all(math.isclose(s["weight/adv"], 1 / 3, rel_tol=1e-5)
                         for s in steps)
    # The retrained network is the searched genotype.
    for run in runs:
        with open(os.path.join(workdir, "runs", run, "search",
                               "genotype.json")) as f:
            searched = json.load(f)
        with open(os.path.join(workdir, "runs", run, "train",
                               "genotype.json")) as f:
            assert json.load(f) == searched
    md = open(os.path.join(results, "results.md")).read()
    assert "| DARTS (accuracy only) | 2 |" in md
    assert "| E2RNAS (ours) | 2 |" in md and "±" in md
    assert "Methods (search settings):" in md
    assert "- **DARTS (accuracy only)** (`darts`): objectives acc" in md
    assert "--config=configs/reproduce.py:tiny" in md
    assert "the same images and PGD starts for every run" in md
    for run in runs:
        for cell in ("normal", "reduce"):
            with open(os.path.join(results, "cells",
                                   f"{run}_{cell}.png"), "rb") as f:
                assert f.read(8) == PNG
            assert os.path.getsize(os.path.join(
                results, "cells", f"{run}_{cell}.svg")) > 1000
    with open(os.path.join(results, "tradeoff.png"), "rb") as f:
        assert f.read(8) == PNG

    # Again: every stage is reused, nothing is trained, same results.
    before = os.path.getmtime(os.path.join(
        workdir, "runs", "darts_s0", "train", "model_last.keras"))
    proc = _cli(args, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reusing its result") == 18
    assert os.path.getmtime(os.path.join(
        workdir, "runs", "darts_s0", "train", "model_last.keras")) == before
    with open(os.path.join(results, "results.json")) as f:
        again = json.load(f)
    assert again["runs"] == out["runs"]


def test_reproduce_needs_a_workdir(subprocess_env):
    proc = _cli(["reproduce", "--config=configs/reproduce.py:tiny"],
                subprocess_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "e2rnas reproduce: error: Expected --workdir=DIR for the runs and "
        "results")


def test_unknown_variant_is_one_line(subprocess_env, tmp_path):
    proc = _cli(["reproduce", "--config=configs/reproduce.py:huge",
                 f"--workdir={tmp_path}"], subprocess_env)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("e2rnas reproduce: error:") and "huge" in last
    assert "Traceback" not in proc.stderr


def test_paper_variant_has_the_papers_settings():
    from configs import reproduce as reproduce_config
    from configs import sweep as sweep_config

    default_search = config_lib.search_config()
    default_train = config_lib.train_config()
    for c in (reproduce_config.get_config("paper"),
              sweep_config.get_config("paper")):
        s, t = c.search, c.train
        assert c.data.name == "cifar10"
        # DARTS / E2RNAS search: 8 cells, C=16, batch 64, 50 epochs at
        # 32x32 on the whole training set, no warm-up.
        assert (s.model.layers, s.model.channels, s.batch_size, s.epochs) \
            == (8, 16, 64, 50)
        assert (s.data.image_size, s.data.num_train, s.arch.warmup_epochs) \
            == (0, 0, 0)
        assert s.optim.to_dict() == default_search.optim.to_dict()
        assert s.arch.lr == default_search.arch.lr == 3e-4
        # Retraining: 20 cells, C=36, 600 epochs, cutout, drop-path, aux.
        assert (t.model.layers, t.model.channels, t.epochs, t.batch_size) \
            == (20, 36, 600, 96)
        assert (t.data.cutout, t.model.drop_path,
                t.model.auxiliary_weight) == (16, 0.2, 0.4)
        assert t.optim.to_dict() == default_train.optim.to_dict()
        # The authors' evaluation (configs/evaluate_authors.py).
        assert t.evaluate.num_examples == 0
        assert tuple(t.evaluate.epsilons) == (1.0, 2.0)
        assert tuple(t.evaluate.attacks) == ("fgsm", "pgd")
        assert not t.evaluate.random_start and t.evaluate.pgd_steps == 10
    assert tuple(reproduce_config.get_config("paper").seeds) == (0, 1, 2)
    # The authors' run is a method of reproduce and the search of sweep.
    paper = reproduce_config.get_config("paper")
    assert "published" in paper.methods and "nomgda" in paper.methods
    published = reproduce.method_configs(paper, "published", 0)[0]
    swept = sweep_config.get_config("paper").search
    for search in (published, swept):
        assert search.resource.cost_model == "authors"
        assert search.arch.order == "second"
        assert search.ood.name == "svhn_cropped"
    assert tuple(sweep_config.get_config("paper").targets) == (
        2.0, 3.0, 4.0, 5.0, 6.0)


# -- processes side by side in one workdir -----------------------------------

def _fake_stages(monkeypatch, calls):
    """pipeline's three stages as instant fakes recording their dirs."""
    def search(config, stage_dir, **kwargs):
        calls.append(stage_dir)
        os.makedirs(stage_dir, exist_ok=True)
        return {"genotype_path": os.path.join(stage_dir, "genotype.json")}

    def train(config, stage_dir, **kwargs):
        calls.append(stage_dir)
        return {"model_path": os.path.join(stage_dir, "model_last.keras")}

    def evaluate(config, model_path, stage_dir, **kwargs):
        calls.append(stage_dir)
        return {}

    monkeypatch.setattr(pipeline, "search_stage", search)
    monkeypatch.setattr(pipeline, "train_stage", train)
    monkeypatch.setattr(pipeline, "evaluate_stage", evaluate)


def test_a_setting_run_by_another_process_is_refused(tmp_path, monkeypatch):
    calls = []
    _fake_stages(monkeypatch, calls)
    run_dir = str(tmp_path / "runs" / "darts_s0")
    c = _tiny()
    search_cfg, train_cfg = reproduce.method_configs(c, "darts", 0)
    with workdir_lib.WorkdirLock(run_dir):   # another process's run
        with pytest.raises(workdir_lib.WorkdirBusyError,
                           match=f"{run_dir} is in use by another e2rnas"):
            pipeline.search_train_evaluate(search_cfg, train_cfg, run_dir,
                                           log=lambda *a: None)
    assert calls == []
    assert os.listdir(run_dir) == []


def test_a_setting_runs_while_the_workdir_is_held(tmp_path, monkeypatch):
    # Another process writing the workdir's results (or running other
    # seeds) does not hold this setting back; its own lock is released.
    calls = []
    _fake_stages(monkeypatch, calls)
    workdir = str(tmp_path)
    run_dir = os.path.join(workdir, "runs", "darts_s1")
    c = _tiny()
    search_cfg, train_cfg = reproduce.method_configs(c, "darts", 1)
    with workdir_lib.WorkdirLock(workdir), \
            workdir_lib.WorkdirLock(os.path.join(workdir, "runs",
                                                 "darts_s0")):
        result = pipeline.search_train_evaluate(
            search_cfg, train_cfg, run_dir, log=lambda *a: None)
    assert calls == [os.path.join(run_dir, d)
                     for d in ("search", "train", "evaluation")]
    assert result["seconds"] == 0
    assert not os.path.exists(os.path.join(run_dir,
                                           workdir_lib.WorkdirLock.FILENAME))


def test_results_wait_for_another_writer_then_refuse(tmp_path, monkeypatch):
    # The runs (fakes here) are not held back by the workdir's lock, the
    # results are: written once it is free, refused (nothing written, the
    # runs kept) while another process still holds it after the wait.
    monkeypatch.setattr(pipeline, "search_train_evaluate",
                        lambda *a, **k: _result())
    monkeypatch.setattr(pipeline, "RESULTS_WAIT_SECONDS", 0.3)
    workdir = str(tmp_path)
    results = os.path.join(workdir, "results")
    with workdir_lib.WorkdirLock(workdir):
        with pytest.raises(workdir_lib.WorkdirBusyError,
                           match="in use by another e2rnas process"):
            reproduce.reproduce(_tiny(), workdir, log=lambda *a: None)
    assert not os.path.exists(results)
    out = reproduce.reproduce(_tiny(), workdir, log=lambda *a: None)
    assert out["results_dir"] == results
    with open(os.path.join(results, "results.json")) as f:
        assert [r["name"] for r in json.load(f)["runs"]] == [
            f"{m} s{s}" for m in ("darts", "e2rnas", "equal")
            for s in (0, 1)]


@pytest.mark.slow
def test_seeds_side_by_side_in_one_workdir(tmp_path, subprocess_env):
    workdir = str(tmp_path / "repro")
    base = [sys.executable, "-m", "e2rnas_tf", "reproduce",
            "--config=configs/reproduce.py:tiny", f"--workdir={workdir}",
            "--config.methods=('darts',)"]
    procs = [subprocess.Popen(base + [f"--config.seeds=({s},)"],
                              cwd=str(REPO), env=subprocess_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # Each ran its own seed's three stages and no other.
    for s, (out, _) in zip((0, 1), outs):
        assert out.count("reproduce: run ") == 1
        assert f"reproduce: run 1/1: DARTS (accuracy only), seed {s}\n" in out
        assert "reusing its result" not in out
    proc = _cli(base[3:] + ["--config.seeds=(0, 1)"], subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reusing its result") == 6
    with open(os.path.join(workdir, "results", "results.json")) as f:
        out = json.load(f)
    assert [r["name"] for r in out["runs"]] == ["darts s0", "darts s1"]
    for r in out["runs"]:
        assert r["clean"] == _eval_json(
            workdir, r["name"].replace(" ", "_"))["clean_accuracy"]
    assert not any(name == workdir_lib.WorkdirLock.FILENAME
                   for _, _, names in os.walk(workdir) for name in names)
