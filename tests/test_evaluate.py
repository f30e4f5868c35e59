"""Tests for e2rnas_tf.training.evaluate: cleverhans attacks against analytic
answers, the sanity checks, agreement with the in-graph attacks of
e2rnas_tf.search.objectives, float32 evaluation of mixed-precision models and the
``e2rnas evaluate`` command end to end."""

import importlib.util
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf import cli, config_lib
from e2rnas_tf.space import costs
from e2rnas_tf.training import evaluate

HAS_OBJECTIVES = importlib.util.find_spec("e2rnas_tf.search.objectives") is not None
HAS_MODEL = importlib.util.find_spec("e2rnas_tf.space.model") is not None

SHAPE = (4, 4, 3)
DIM = int(np.prod(SHAPE))


def _linear_model(kernel, bias):
    """``logits = flatten(x) @ kernel + bias`` with fixed float32 weights."""
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                              keras.layers.Dense(kernel.shape[1])])
    model.layers[-1].set_weights([kernel.astype(np.float32),
                                  bias.astype(np.float32)])
    return model


def _conv_model(classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(SHAPE), keras.layers.Conv2D(6, 3, padding="same"),
        keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dense(classes)])


# ---------------------------------------------------------------------------
# Known answers.


def test_model_that_ignores_its_input_keeps_clean_accuracy():
    # Zero kernel: the input gradient is exactly 0 and the logits are the
    # bias, so no perturbation (not even PGD's random start) changes a
    # prediction; accuracy is the share of labels equal to argmax(bias) = 1.
    model = _linear_model(np.zeros((DIM, 3)), np.array([0.0, 2.0, 1.0]))
    rng = np.random.RandomState(0)
    images = rng.uniform(0, 1, (12,) + SHAPE).astype(np.float32)
    labels = np.array([1, 0, 2, 1, 1, 0, 2, 2, 1, 0, 0, 1])
    expected = np.mean(labels == 1)
    report = evaluate.evaluate_model(
        model, (images, labels), attacks=evaluate.ATTACKS,
        epsilons=(2, 8, 255), pgd_steps=3, restarts=2, batch_size=5)
    assert report["num_examples"] == 12
    assert report["clean_accuracy"] == expected
    for name in evaluate.ATTACKS:
        assert report["robust_accuracy"][name] == {
            "2": expected, "8": expected, "255": expected}
    assert report["sanity"]["passed"], report["sanity"]["flags"]


def _block_linear_problem(classes, seed=0):
    """A linear model whose worst-case L-inf perturbation is known exactly.

    Class ``k`` reads only its own block of pixels (disjoint supports), so
    the cross-entropy input gradient on block ``k`` is ``(p_k - [k == y])
    w_k``: the sign pattern is ``-sign(w_y)`` on the label's block and
    ``+sign(w_k)`` elsewhere, whatever the point. One signed step of eps
    (FGSM) therefore lowers ``z_y`` by ``eps * |w_y|_1`` and raises every
    other ``z_k`` by ``eps * |w_k|_1``, which is also the worst case, so
    PGD, BIM and MIM (whose steps all take the same sign pattern) end at
    the same corner. Pixels are in [0.1, 0.9], so eps <= 0.1 never clips.
    A correctly classified point is lost iff for some ``k != y``
    ``z_y - z_k <= eps * |w_y - w_k|_1`` (= ``eps (|w_y|_1 + |w_k|_1)``).
    """
    rng = np.random.RandomState(seed)
    blocks = np.array_split(np.arange(DIM), classes)
    kernel = np.zeros((DIM, classes))
    for k, block in enumerate(blocks):
        kernel[block, k] = np.sign(rng.randn(len(block))) * rng.uniform(
            0.25, 1.0, len(block))
    # Float32 copies: the analytic answer uses the weights the model holds.
    kernel = kernel.astype(np.float32).astype(np.float64)
    bias = np.zeros(classes)
    images = rng.uniform(0.1, 0.9, (160,) + SHAPE).astype(np.float32)
    logits = images.reshape(len(images), -1).astype(np.float64) @ kernel
    bias = -logits.mean(0)  # balanced predictions
    logits += bias
    labels = logits.argmax(-1)
    wrong = rng.rand(len(labels)) < 0.2  # some clean mistakes too
    labels[wrong] = (labels[wrong] + 1 + rng.randint(
        0, classes - 1, wrong.sum())) % classes
    return kernel, bias, images, labels, logits


def _expected_robust(kernel, logits, labels, eps):
    l1 = np.abs(kernel).sum(0)
    z_y = logits[np.arange(len(labels)), labels]
    slack = z_y[:, None] - logits - eps * (l1[labels][:, None] + l1[None, :])
    slack[np.arange(len(labels)), labels] = np.inf
    return slack.min(1) > 0, np.abs(slack).min(1)


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_model_loses_exactly_the_points_within_eps(classes):
    kernel, bias, images, labels, logits = _block_linear_problem(classes)
    epsilons = (2.0, 8.0)
    keep = np.ones(len(labels), bool)
    for eps in epsilons:
        _, gap = _expected_robust(kernel, logits, labels, eps / 255)
        keep &= gap > 1e-3  # no point within float32 round-off of a tie
    images, labels, logits = images[keep], labels[keep], logits[keep]
    assert len(labels) > 100
    model = _linear_model(kernel, bias)
    report = evaluate.evaluate_model(
        model, (images, labels), attacks=evaluate.ATTACKS,
        epsilons=epsilons, pgd_steps=10, restarts=2, batch_size=64)
    clean = logits.argmax(-1) == labels
    assert report["clean_correct"] == clean.sum()
    for eps in epsilons:
        robust, _ = _expected_robust(kernel, logits, labels, eps / 255)
        # The construction must leave both kinds of correct points.
        assert 0 < robust.sum() < clean.sum()
        for name in evaluate.ATTACKS:
            entry = report["attacks"][name]["epsilons"][f"{eps:g}"]
            assert entry["correct"] == robust.sum(), (name, eps)
        # Per example, for FGSM.
        adv = evaluate.cleverhans_attack(
            lambda x: model(x, training=False), images, labels,
            name="fgsm", eps=eps / 255)
        np.testing.assert_array_equal(
            model(adv).numpy().argmax(-1) == labels, robust)
        # The adversarial images stay in the ball and in [0, 1].
        assert np.abs(adv.numpy() - images).max() <= eps / 255 + 1e-6
    assert report["sanity"]["passed"], report["sanity"]["flags"]


def test_model_is_evaluated_in_inference_mode():
    # Batch norm whose moving statistics differ from any batch's: labels
    # are the inference-mode predictions, so inference mode scores exactly
    # 1, batch statistics (training mode) would not, and the moving
    # statistics must not be updated by the evaluation.
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                              keras.layers.BatchNormalization(),
                              keras.layers.Dense(3)])
    bn = model.layers[1]
    rng = np.random.RandomState(4)
    bn.moving_mean.assign(rng.uniform(0.3, 0.7, DIM).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.01, 0.02, DIM).astype(np.float32))
    images = rng.uniform(0, 1, (32,) + SHAPE).astype(np.float32)
    labels = model(images, training=False).numpy().argmax(-1)
    assert np.mean(model(images, training=True).numpy().argmax(-1)
                   == labels) < 0.8
    before = [w.copy() for w in model.get_weights()]
    report = evaluate.evaluate_model(model, (images, labels),
                                     attacks=("fgsm",), epsilons=(1,))
    assert report["clean_accuracy"] == 1.0
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Sanity checks and restarts on a small trained network.


@pytest.fixture(scope="module")
def trained():
    """A tiny conv net fitted to separable synthetic images."""
    rng = np.random.RandomState(1)
    labels = rng.randint(0, 3, 96)
    centres = rng.uniform(0.2, 0.8, (3,) + SHAPE)
    images = np.clip(centres[labels] + 0.15 * rng.randn(96, *SHAPE), 0, 1)
    images = images.astype(np.float32)
    model = _conv_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model.fit(images, labels, batch_size=32, epochs=15, verbose=0)
    return model, images[:48], labels[:48]


def test_eps0_equals_clean_and_attacks_are_ordered(trained):
    model, images, labels = trained
    report = evaluate.evaluate_model(
        model, (images, labels), attacks=("fgsm", "pgd", "mim"),
        epsilons=(4, 16, 32), pgd_steps=5, batch_size=20)
    clean = report["clean_accuracy"]
    assert clean > 0.8  # trained: the attacks have something to remove
    assert report["sanity"]["eps0_fgsm_accuracy"] == clean
    checks = {c["name"]: c for c in report["sanity"]["checks"]}
    assert checks["eps0_equals_clean"]["passed"]
    acc = report["robust_accuracy"]
    for eps in ("4", "16", "32"):
        ok = acc["pgd"][eps] <= acc["fgsm"][eps] <= clean
        flagged = any(f"at eps {eps}/255" in f and "gradient masking" in f
                      for f in report["sanity"]["flags"])
        assert ok or flagged
        assert ok == (checks[f"pgd@{eps}<=fgsm"]["passed"]
                      and checks[f"fgsm@{eps}<=clean"]["passed"])
    assert acc["pgd"]["32"] < clean  # the attack does bite at 32/255


def test_restarts_never_increase_robust_accuracy(trained):
    model, images, labels = trained
    settings = dict(attacks=("pgd",), epsilons=(8,), pgd_steps=2,
                    batch_size=48, seed=3)
    one = evaluate.evaluate_model(model, (images, labels), restarts=1,
                                  **settings)
    three = evaluate.evaluate_model(model, (images, labels), restarts=3,
                                    **settings)
    entry = three["attacks"]["pgd"]["epsilons"]["8"]
    assert entry["restarts"] == 3
    assert len(entry["restart_accuracies"]) == 3
    # Robust = survives every start, so at most each start's accuracy.
    assert entry["accuracy"] <= min(entry["restart_accuracies"])
    # Same seed: the first start of both runs is the same draw.
    first = one["attacks"]["pgd"]["epsilons"]["8"]["restart_accuracies"][0]
    assert entry["restart_accuracies"][0] == first
    assert entry["accuracy"] <= one["robust_accuracy"]["pgd"]["8"]


def test_sanity_checks_flag_violations():
    good = evaluate.sanity_checks(
        10, 10, {"fgsm": {2.0: 8, 8.0: 5}, "pgd": {2.0: 7, 8.0: 3}})
    assert good["passed"] and good["flags"] == []
    bad = evaluate.sanity_checks(
        10, 9, {"fgsm": {2.0: 8, 8.0: 5}, "pgd": {2.0: 9, 8.0: 6},
                "mim": {2.0: 11, 8.0: 4}})
    assert not bad["passed"]
    failed = {c["name"] for c in bad["checks"] if not c["passed"]}
    assert failed == {"eps0_equals_clean", "pgd@2<=fgsm", "pgd@8<=fgsm",
                      "mim@2<=clean", "mim@2<=fgsm"}
    assert sum("possible gradient masking" in f for f in bad["flags"]) == 4
    rising = evaluate.sanity_checks(10, 10, {"fgsm": {1.0: 4, 8.0: 6}})
    assert [c["name"] for c in rising["checks"] if not c["passed"]] == [
        "fgsm@8<=fgsm@1"]


def test_invalid_settings_are_rejected():
    data = (np.zeros((2,) + SHAPE, np.float32), np.zeros(2, np.int32))
    model = _linear_model(np.zeros((DIM, 2)), np.zeros(2))
    for kwargs, match in (
            (dict(attacks=("cw",)), "Expected attacks"),
            (dict(epsilons=(-1,)), "epsilons"),
            (dict(step_size=4.0, epsilons=(2, 8)), "step_size <= every eps"),
            (dict(restarts=0), "restarts"),
            (dict(pgd_steps=1.5), "pgd_steps")):
        with pytest.raises(evaluate.EvaluationError, match=match):
            evaluate.evaluate_model(model, data, **kwargs)
    with pytest.raises(evaluate.EvaluationError, match=r"\[0, 1\]"):
        evaluate.evaluate_model(model, (data[0] + 2, data[1]))


# ---------------------------------------------------------------------------
# Agreement with the in-graph attacks used in search and training.


@pytest.mark.xfail(not HAS_OBJECTIVES, raises=ImportError, strict=True,
                   reason="e2rnas_tf.search.objectives (in-graph attacks) missing")
def test_cleverhans_agrees_with_objectives_attacks():
    from e2rnas_tf.search import objectives

    model = _conv_model(seed=2)
    rng = np.random.RandomState(2)
    images = tf.constant(rng.uniform(0, 1, (8,) + SHAPE), tf.float32)
    labels = tf.constant(rng.randint(0, 3, 8), tf.int32)

    def model_fn(x):
        return model(x, training=False)

    seed = tf.constant([0, 0])
    eps = 8 / 255
    ours = objectives.fgsm(model_fn, images, labels, eps=eps, step_size=eps,
                           random_start=False, seed=seed)
    theirs = evaluate.cleverhans_attack(model_fn, images, labels,
                                        name="fgsm", eps=eps)
    assert np.abs(ours.numpy() - images.numpy()).max() > eps / 2
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)
    ours = objectives.pgd(model_fn, images, labels, eps=eps,
                          step_size=2 / 255, steps=5, random_start=False,
                          seed=seed)
    theirs = evaluate.cleverhans_attack(
        model_fn, images, labels, name="pgd", eps=eps, step_size=2 / 255,
        steps=5, random_start=False)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)
    # Through the config (budgets in /255 on both sides).
    cfg = config_lib.attack_config(name="pgd", eps=8.0, step_size=3.0,
                                   steps=4, random_start=False)
    ours = objectives.attack(model_fn, images, labels, cfg, seed)
    theirs = evaluate.cleverhans_attack(
        model_fn, images, labels, name="pgd", eps=8 / 255, step_size=3 / 255,
        steps=4)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)


# ---------------------------------------------------------------------------
# Precision.


def test_mixed_precision_model_is_attacked_in_float32():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = _conv_model()
        # A layer whose name looks like a policy keeps its name.
        mixed.layers[-1].name = "mixed_5b"
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert mixed.layers[0].compute_dtype == "bfloat16"
    clone, note = evaluate.float32_model(mixed, (None,) + SHAPE)
    assert clone is not mixed and "float32" in note
    assert {layer.compute_dtype for layer in clone.layers} == {"float32"}
    assert [layer.name for layer in clone.layers] == [
        layer.name for layer in mixed.layers]
    for a, b in zip(clone.get_weights(), mixed.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Float32 reference: the same weights in a model built as float32.
    reference = _conv_model()
    reference.set_weights(mixed.get_weights())
    x = tf.random.uniform((4,) + SHAPE, seed=1)
    np.testing.assert_allclose(clone(x).numpy(), reference(x).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert evaluate.float32_model(reference, (None,) + SHAPE)[0] is reference


# ---------------------------------------------------------------------------
# The command line, end to end.


@pytest.mark.skipif(not HAS_MODEL, reason="e2rnas_tf.space.model missing")
def test_evaluate_command_end_to_end(tmp_path):
    from e2rnas_tf.space import genotypes
    from e2rnas_tf.space import model as model_lib

    config = config_lib.train_config()
    config.data.image_size = 8
    config.evaluate.num_examples = 12
    config.evaluate.epsilons = (2.0, 8.0)
    config.evaluate.attacks = ("fgsm", "pgd")
    config.evaluate.pgd_steps = 2
    config.evaluate.batch_size = 8
    config.lock()
    run = tmp_path / "train"
    run.mkdir()
    keras.utils.set_random_seed(0)
    net = model_lib.DerivedNetwork("E2RNAS", channels=4, num_classes=10,
                                   layers=3, auxiliary=True)
    net(tf.zeros((1, 8, 8, 3)))
    net.save(run / "model_best.keras")
    genotypes.get("E2RNAS").save(str(run / "genotype.json"))
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    args = cli.Args(command="evaluate", workdir=str(tmp_path / "out"),
                    overwrite=False, genotype=None, checkpoint=str(run),
                    export_base=None, model_name="e2rnas", output=None,
                    extra=())
    assert evaluate.main(config, args) == 0

    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["checkpoint"] == str(run / "model_best.keras")
    assert report["num_examples"] == 12
    assert report["dataset"] == "embedded" and report["num_classes"] == 10
    assert report["params"] == costs.count_params(net)
    if "flops" in report:
        assert report["flops"] == costs.count_inference_macs(net, 8)
    else:
        assert report["flops_note"].startswith("FLOPs omitted")
    assert report["genotype"] == genotypes.get("E2RNAS").to_dict()
    assert set(report["robust_accuracy"]) == {"fgsm", "pgd"}
    for per_eps in report["robust_accuracy"].values():
        assert set(per_eps) == {"2", "8"}
        assert all(0 <= a <= 1 for a in per_eps.values())
    assert 0 <= report["clean_accuracy"] <= 1
    assert report["sanity"]["checks"][0]["name"] == "eps0_equals_clean"
    assert report["sanity"]["checks"][0]["passed"]
    assert report["precision"] == "model computes in float32"
    table = (tmp_path / "out" / "evaluation.md").read_text()
    assert "| attack | eps=2/255 | eps=8/255 |" in table
    pgd = 100 * report["robust_accuracy"]["pgd"]["8"]
    assert "| PGD-2 | " in table and f"{pgd:.2f} |" in table
    assert "warning" not in report
    # Without --workdir the files go next to the checkpoint; data other
    # than the run's are reported.
    trained_on = config.to_dict()
    trained_on["data"]["image_size"] = 16
    (run / "config.json").write_text(json.dumps(trained_on))
    args = cli.Args(**{**args.__dict__, "workdir": None,
                       "checkpoint": str(run / "model_best.keras")})
    assert evaluate.main(config, args) == 0
    assert os.path.isfile(run / "evaluation.md")
    report = json.loads((run / "evaluation.json").read_text())
    assert report["warning"] == (
        "the model was trained with data image_size=16 (here 8)")


def test_evaluate_command_rejects_missing_checkpoint(tmp_path):
    config = config_lib.train_config()
    config.lock()
    args = cli.Args(command="evaluate", workdir=None, overwrite=False,
                    genotype=None, checkpoint=str(tmp_path / "nothing"),
                    export_base=None, model_name="e2rnas", output=None,
                    extra=())
    with pytest.raises(ValueError, match="does not exist"):
        evaluate.main(config, args)


def test_evaluate_command_line_on_a_trained_model(tmp_path, subprocess_env):
    # The real entry point: flag parsing (tuple overrides), loading a .keras
    # file of a plain Keras model, the data pipeline and the outputs. The
    # clean accuracy must equal the model's own, computed here on the same
    # seeded subset.
    import subprocess
    import sys

    from e2rnas_tf import data as data_lib

    data_cfg = config_lib.data_config(image_size=4)
    train, test, _ = data_lib.load(data_cfg)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4, 4, 3)), keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model.fit(train.images / 255.0, train.labels, batch_size=100, epochs=3,
              verbose=0)
    model.save(tmp_path / "tiny.keras")
    subset = evaluate._subset(test, 40, seed=0)
    expected = np.mean(model.predict(subset.images / 255.0, verbose=0)
                       .argmax(-1) == subset.labels)

    (tmp_path / "cfg.py").write_text(
        "from e2rnas_tf import config_lib\n\n\n"
        "def get_config():\n"
        "    c = config_lib.train_config()\n"
        "    c.data.image_size = 4\n"
        "    c.lock()\n"
        "    return c\n")
    result = subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", "evaluate",
         f"--config={tmp_path / 'cfg.py'}",
         f"--checkpoint={tmp_path / 'tiny.keras'}",
         f"--workdir={tmp_path / 'out'}",
         "--config.evaluate.num_examples=40",
         "--config.evaluate.attacks=('fgsm', 'bim')",
         "--config.evaluate.epsilons=(4.0, 16.0)",
         "--config.evaluate.pgd_steps=3"],
        env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["num_examples"] == 40
    assert report["clean_accuracy"] == pytest.approx(expected)
    assert report["clean_accuracy"] > 0.1  # trained: above chance
    assert report["evaluate_config"]["attacks"] == ["fgsm", "bim"]
    assert set(report["robust_accuracy"]) == {"fgsm", "bim"}
    assert set(report["robust_accuracy"]["bim"]) == {"4", "16"}
    assert report["params"] == model.count_params()
    assert report["flops"] == 4 * 4 * 3 * 3 * 3 * 8 + 4 * 4 * 8 * 10
    table = (tmp_path / "out" / "evaluation.md").read_text()
    assert table in result.stdout  # the table is printed too
    assert "| BIM-3 |" in table
