"""The whole product as a user drives it, through the CLI, on tiny settings:
search -> train the found genotype -> evaluate it -> export it -> plot it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from e2rnas_tf.space import genotypes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIMITIVES = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
DATA = ["--config.data.image_size=8", "--config.data.num_train=160",
        "--config.data.num_test=32", "--config.batch_size=8",
        "--config.eval_batch_size=16"]


def e2rnas(env, *args):
    result = subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (args[0], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_search_train_evaluate_export_plot(tmp_path, subprocess_env):
    search_dir = str(tmp_path / "search")
    e2rnas(subprocess_env, "search", "--config=configs/search_demo.py",
           f"--workdir={search_dir}", *DATA, "--config.epochs=1",
           "--config.steps_per_epoch=3", "--config.model.layers=3",
           "--config.model.channels=4",
           "--config.model.primitives=" + repr(PRIMITIVES),
           "--config.resource.layers=5", "--config.resource.channels=8")
    genotype_path = os.path.join(search_dir, "genotype.json")
    found = genotypes.Genotype.load(genotype_path)
    assert {op for op, _ in found.normal + found.reduce} <= set(PRIMITIVES)

    train_dir = str(tmp_path / "train")
    e2rnas(subprocess_env, "train", "--config=configs/train_demo.py",
           f"--workdir={train_dir}", f"--genotype={genotype_path}", *DATA,
           "--config.epochs=1", "--config.steps_per_epoch=3",
           "--config.model.layers=3", "--config.model.channels=4")
    assert genotypes.Genotype.load(
        os.path.join(train_dir, "genotype.json")) == found
    assert os.path.exists(os.path.join(train_dir, "model_best.keras"))

    e2rnas(subprocess_env, "evaluate", "--config=configs/train_demo.py",
           f"--checkpoint={train_dir}", *DATA,
           "--config.evaluate.num_examples=16",
           "--config.evaluate.epsilons=(0.0, 8.0)",
           "--config.evaluate.attacks=('fgsm', 'pgd')",
           "--config.evaluate.pgd_steps=2")
    with open(os.path.join(train_dir, "evaluation.json")) as f:
        report = json.load(f)
    text = json.dumps(report)
    assert report["genotype"] == found.to_dict()
    clean = report["clean_accuracy"]
    assert 0.0 <= clean <= 1.0
    assert "fgsm" in text and "pgd" in text
    _check_evaluation_events(os.path.join(train_dir, "tb", "evaluation"),
                             report)

    serving = str(tmp_path / "serving")
    e2rnas(subprocess_env, "export", "--config=configs/train_demo.py",
           f"--checkpoint={train_dir}", f"--export_base={serving}",
           "--model_name=tiny", *DATA)
    version = os.path.join(serving, "tiny", "1")
    assert os.path.exists(os.path.join(version, "saved_model.pb"))
    with open(os.path.join(version, "assets.extra",
                           "e2rnas_metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["genotype"] == found.to_dict()
    with open(os.path.join(serving, "models.config")) as f:
        assert "tiny" in f.read()

    import tensorflow as tf
    served = tf.saved_model.load(version).signatures["serving_default"]
    out = served(images=tf.zeros([2, 8, 8, 3], tf.uint8))
    assert out["probabilities"].shape == (2, 10)
    np.testing.assert_allclose(
        out["probabilities"].numpy().sum(axis=-1), 1.0, atol=1e-5)

    figures = str(tmp_path / "figures")
    e2rnas(subprocess_env, "plot", f"--genotype={genotype_path}",
           f"--output={figures}")
    assert any(name.endswith(".png") for name in os.listdir(figures))
    assert any(name.endswith(".svg") for name in os.listdir(figures))

    # A directory of runs: the trade-off of the evaluated ones.
    e2rnas(subprocess_env, "plot", f"--workdir={tmp_path}",
           f"--output={figures}")
    assert os.path.getsize(os.path.join(figures, "tradeoff.png")) > 1000


def _check_evaluation_events(logdir, report):
    """evaluate's TensorBoard scalars, read back with TensorBoard's reader."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        logdir, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    values = {tag: {e.step: float(tf.make_ndarray(e.tensor_proto))
                    for e in acc.Tensors(tag)}
              for tag in acc.Tags()["tensors"]}
    assert values["eval/clean_accuracy"] == {
        0: pytest.approx(report["clean_accuracy"])}
    for attack, per_eps in report["robust_accuracy"].items():
        assert values[f"eval/{attack}_accuracy"] == {
            int(round(float(eps))): pytest.approx(accuracy)
            for eps, accuracy in per_eps.items()}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
