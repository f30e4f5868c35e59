"""``e2rnas evaluate`` never replaces another evaluation's report without
``--overwrite``; rerunning the same evaluation replaces it (idempotent)."""

import json
import os
import shutil

import keras
import numpy as np
import pytest

from e2rnas_tf import cli, config_lib
from e2rnas_tf import data as data_lib
from e2rnas_tf.runs import checkpoints as ckpt_lib
from e2rnas_tf.runs import workdir as workdir_lib
from e2rnas_tf.training import evaluate
from tests.config_util import set_fields


def _config(**overrides):
    c = config_lib.train_config()
    c.data.image_size = 4
    c.evaluate.num_examples = 8
    c.evaluate.attacks = ("fgsm",)
    c.evaluate.epsilons = (2.0,)
    c.evaluate.batch_size = 8
    set_fields(c, overrides)
    c.lock()
    return c


@pytest.fixture
def checkpoint(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    path = tmp_path / "model.keras"
    model.save(path)
    return str(path)


def _files(out):
    return {name: (out / name).read_bytes()
            for name in ("evaluation.json", "evaluation.md")}


def _quiet(_):
    pass


def test_another_evaluation_is_refused_and_kept(checkpoint, tmp_path,
                                                monkeypatch):
    out = tmp_path / "out"
    first = evaluate.evaluate(_config(), checkpoint, str(out), log=_quiet)
    assert first["checkpoint"] == checkpoint
    assert first["data"]["image_size"] == 4
    stored = json.loads((out / "evaluation.json").read_text())
    assert stored["evaluate_config"]["epsilons"] == [2.0]
    before = _files(out)

    # Refused before the model is even loaded.
    def no_load(path):
        raise AssertionError(f"loaded {path}")

    other = str(tmp_path / "other.keras")
    shutil.copy(checkpoint, other)
    cases = [
        (_config(**{"evaluate.epsilons": (8.0,)}), checkpoint,
         "evaluate_config.epsilons: [2.0] there, [8.0] here"),
        (_config(), other,
         f"checkpoint: {checkpoint!r} there, {other!r} here"),
        (_config(**{"data.image_size": 8}), checkpoint,
         "data.image_size: 4 there, 8 here"),
        (_config(**{"data.name": "folder", "data.root": "/x"}), checkpoint,
         "data.name: 'embedded' there, 'folder' here; data.root: '' there, "
         "'/x' here"),
        (_config(seed=3), checkpoint, "seed: 0 there, 3 here"),
    ]
    with monkeypatch.context() as patch:
        patch.setattr(ckpt_lib, "load_model_file", no_load)
        for config, path, difference in cases:
            with pytest.raises(workdir_lib.WorkdirError) as error:
                evaluate.evaluate(config, path, str(out), log=_quiet)
            message = str(error.value)
            assert message.startswith(f"{out} holds another evaluation (")
            assert difference in message, message
            assert message.endswith("pass --overwrite to replace it or "
                                    "choose another --workdir")
            assert "\n" not in message
            assert _files(out) == before

    # The command line passes --overwrite through: then it replaces.
    args = cli.Args(command="evaluate", workdir=str(out), overwrite=False,
                    genotype=None, checkpoint=checkpoint, export_base=None,
                    model_name="e2rnas", output=None, extra=())
    eight = _config(**{"evaluate.epsilons": (8.0,)})
    with pytest.raises(workdir_lib.WorkdirError, match="--overwrite"):
        evaluate.main(eight, args)
    assert _files(out) == before
    args = cli.Args(**{**args.__dict__, "overwrite": True})
    assert evaluate.main(eight, args) == 0
    stored = json.loads((out / "evaluation.json").read_text())
    assert stored["evaluate_config"]["epsilons"] == [8.0]
    assert set(stored["robust_accuracy"]["fgsm"]) == {"8"}
    assert "eps=8/255" in (out / "evaluation.md").read_text()


def test_the_same_evaluation_is_rerun(checkpoint, tmp_path):
    out = tmp_path / "out"
    first = evaluate.evaluate(_config(), checkpoint, str(out), log=_quiet)
    # Also when named by another spelling of the same path.
    relative = os.path.relpath(checkpoint)
    second = evaluate.evaluate(_config(), relative, str(out), log=_quiet)
    stored = json.loads((out / "evaluation.json").read_text())
    assert stored["checkpoint"] == checkpoint
    for key in ("clean_accuracy", "robust_accuracy", "num_examples"):
        assert second[key] == first[key] == stored[key]
    # Fields that do not change the test images may differ.
    third = evaluate.evaluate(
        _config(**{"data.num_train": 50, "data.cutout": 4}), checkpoint,
        str(out), log=_quiet)
    assert third["clean_accuracy"] == first["clean_accuracy"]


def _tb_scalars(out):
    """``(number of event files, {tag: {step: value}})`` of the report's
    TensorBoard directory."""
    import tensorflow as tf

    files = sorted((out / "tb" / "evaluation").glob("events.out.tfevents.*"))
    scalars = {}
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(
                    tf.make_ndarray(value.tensor))
    return len(files), scalars


def test_tensorboard_holds_only_the_current_evaluation(checkpoint, tmp_path):
    out = tmp_path / "out"
    evaluate.evaluate(_config(), checkpoint, str(out), log=_quiet)
    again = evaluate.evaluate(_config(), checkpoint, str(out), log=_quiet)
    count, scalars = _tb_scalars(out)
    # A rerun replaced the event file instead of adding a second one.
    assert count == 1
    assert scalars["eval/clean_accuracy"] == {
        0: pytest.approx(again["clean_accuracy"])}
    assert scalars["eval/fgsm_accuracy"] == {
        2: pytest.approx(again["robust_accuracy"]["fgsm"]["2"])}
    # --overwrite with other budgets: only the new evaluation's curve.
    eight = evaluate.evaluate(_config(**{"evaluate.epsilons": (8.0,)}),
                              checkpoint, str(out), overwrite=True,
                              log=_quiet)
    count, scalars = _tb_scalars(out)
    assert count == 1
    assert scalars["eval/fgsm_accuracy"] == {
        8: pytest.approx(eight["robust_accuracy"]["fgsm"]["8"])}


def test_evaluation_seed_fixes_the_subset_whatever_the_run_seed(
        checkpoint, tmp_path):
    # evaluate.seed=-1 (default): the run's seed picks the subset.
    by_run = evaluate.evaluate(_config(seed=3), checkpoint,
                               str(tmp_path / "a"), log=_quiet)
    assert by_run["seed"] == 3
    # A fixed evaluation seed: runs of any seed see the same images.
    fixed = [evaluate.evaluate(_config(seed=s, **{"evaluate.seed": 3}),
                               checkpoint, str(tmp_path / f"s{s}"),
                               log=_quiet) for s in (0, 1)]
    for report in fixed:
        assert report["seed"] == 3
        for key in ("clean_accuracy", "robust_accuracy"):
            assert report[key] == by_run[key]
    # Labels that are their indices show which examples a seed picks.
    indexed = data_lib.ArrayData(np.zeros((100, 1, 1, 3), np.uint8),
                                 np.arange(100, dtype=np.int32))
    chosen = [evaluate._subset(indexed, 8, s).labels for s in (0, 3)]
    assert list(chosen[0]) != list(chosen[1])  # the seed matters
    with pytest.raises(evaluate.EvaluationError,
                       match=r"config.evaluate.seed to be an integer >= 0, "
                             r"or -1 for the run's seed. Received: -2"):
        evaluate.evaluate(_config(**{"evaluate.seed": -2}), checkpoint,
                          str(tmp_path / "bad"), log=_quiet)
    assert not (tmp_path / "bad").exists()


def test_an_unreadable_report_is_refused(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "evaluation.json").write_text("{cut short")
    with pytest.raises(workdir_lib.WorkdirError) as error:
        evaluate.evaluate(_config(), checkpoint, str(out), log=_quiet)
    assert str(error.value).startswith(
        f"{out / 'evaluation.json'} exists and is not readable "
        "(Expecting property name")
    assert "--overwrite" in str(error.value)
    assert (out / "evaluation.json").read_text() == "{cut short"
    evaluate.evaluate(_config(), checkpoint, str(out), overwrite=True,
                      log=_quiet)
    assert json.loads((out / "evaluation.json").read_text())[
        "num_examples"] == 8
