"""``e2rnas evaluate`` never replaces another evaluation's report without
``--overwrite``; rerunning the same evaluation replaces it (idempotent)."""

import json
import os
import shutil

import keras
import pytest

from e2rnas_tf import cli
from e2rnas_tf import config_lib
from e2rnas_tf import evaluate
from e2rnas_tf import export as export_lib
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
    report = str(out / "evaluation.json")
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
        patch.setattr(export_lib, "load_checkpoint", no_load)
        for config, path, difference in cases:
            with pytest.raises(evaluate.EvaluationError) as error:
                evaluate.evaluate(config, path, str(out), log=_quiet)
            message = str(error.value)
            assert message.startswith(f"{report} holds another evaluation (")
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
    with pytest.raises(evaluate.EvaluationError, match="--overwrite"):
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


def test_an_unreadable_report_is_refused(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "evaluation.json").write_text("{cut short")
    with pytest.raises(evaluate.EvaluationError) as error:
        evaluate.evaluate(_config(), checkpoint, str(out), log=_quiet)
    assert str(error.value).startswith(
        f"{out / 'evaluation.json'} exists and is not a readable evaluation "
        "(Expecting property name")
    assert "--overwrite" in str(error.value)
    assert (out / "evaluation.json").read_text() == "{cut short"
    evaluate.evaluate(_config(), checkpoint, str(out), overwrite=True,
                      log=_quiet)
    assert json.loads((out / "evaluation.json").read_text())[
        "num_examples"] == 8
