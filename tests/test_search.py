"""Tests of the E2RNAS search step and run (`e2rnas_tf.search`).

Tiny sizes throughout: 3 cells of 2 nodes, 4 channels, 4 candidate ops,
8x8 images, batch 8. Single steps run eagerly (tracing the step costs more
than running it a few times); the short searches and the CLI run compiled.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf.runs import metrics
from e2rnas_tf.search import objectives as obj_lib
from e2rnas_tf.search import resources
from e2rnas_tf.search import run as search
from e2rnas_tf.search import step as step_lib
from e2rnas_tf.space import genotypes
from tests.search_util import (
    PRIMITIVES,
    batch,
    make_step,
    tiny_config,
    tiny_flags,
    values,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = tiny_flags(log_every=1)


def ce_grads(net, images, labels, variables):
    with tf.GradientTape() as tape:
        logits = net(images, training=True)
        loss = obj_lib.cross_entropy(logits, labels)
    return loss, [g.numpy() for g in tape.gradient(loss, variables)]


def adam_reference(params, grads, lr, beta1, beta2, wd, eps=1e-8, t=1):
    """PyTorch's Adam (L2 in the gradient), first step from zero moments."""
    out = []
    for p, g in zip(params, grads):
        g = g + wd * p
        m = (1 - beta1) * g
        v = (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        out.append(p - lr * m_hat / (np.sqrt(v_hat) + eps))
    return out


def test_acc_only_step_is_plain_darts_first_order(eager):
    config = tiny_config(**{"combine.normalization": "l2"})
    net, step = make_step(config)
    train, valid = batch(1), batch(2)
    alpha0, w0 = values(net.arch_variables), values(net.weight_variables)
    _, g_alpha = ce_grads(net, *valid, net.arch_variables)

    metrics = step(train, valid)

    # alpha: one Adam step on the raw validation gradient (MGDA with K=1
    # gives weight 1 and no normalisation).
    a = config.arch
    expected = adam_reference(alpha0, g_alpha, a.lr, a.beta1, a.beta2,
                              a.weight_decay)
    alpha1 = values(net.arch_variables)
    for got, want in zip(alpha1, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert float(metrics["weight/acc"]) == 1.0
    assert float(metrics["skipped"]) == 0.0

    # w: one SGD step (clip at norm 5, then L2) at the *new* alpha.
    w1 = values(net.weight_variables)
    for v, x in zip(net.weight_variables, w0):
        v.assign(x)
    _, g_w = ce_grads(net, *train, net.weight_variables)
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in g_w))
    scale = min(1.0, config.optim.grad_clip / norm)
    o = config.optim
    for got, w, g in zip(w1, w0, g_w):
        want = w - o.lr * (scale * g + o.weight_decay * w)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert int(step.iterations.numpy()) == 1


class SmoothNet(keras.Model):
    """A smooth stand-in for the supernet (same alpha shapes).

    Finite-difference Hessian-vector products on a ReLU / max-pool network
    of this size are dominated by kinks crossed within the eps-ball, so the
    second-order maths is checked on a network that is smooth in both w
    and alpha (and nonlinear in both, with cross terms).
    """

    def __init__(self):
        super().__init__()
        init = keras.initializers.RandomNormal(stddev=0.5, seed=3)
        self.alpha_normal = self.add_weight(shape=(5, 4), initializer=init,
                                            name="alpha_normal")
        self.alpha_reduce = self.add_weight(shape=(5, 4), initializer=init,
                                            name="alpha_reduce")
        self.w1 = self.add_weight(shape=(192, 16), initializer=init)
        self.w2 = self.add_weight(shape=(40, 16), initializer=init)
        self.w3 = self.add_weight(shape=(16, 10), initializer=init)

    @property
    def arch_variables(self):
        return [self.alpha_normal, self.alpha_reduce]

    @property
    def weight_variables(self):
        return [self.w1, self.w2, self.w3]

    def call(self, images, training=False):
        x = tf.reshape(images, [-1, 192])
        h = tf.tanh(tf.matmul(x, self.w1) / 8.0)
        gate = tf.concat([tf.reshape(tf.nn.softmax(self.alpha_normal), [-1]),
                          tf.reshape(tf.nn.softmax(self.alpha_reduce), [-1])],
                         axis=0)
        h = h * tf.tanh(tf.matmul(gate[None], self.w2))
        return tf.matmul(h, self.w3)


def test_second_order_matches_autodiff_through_virtual_step(eager):
    # A large lr makes the implicit (Hessian) term a sizeable part.
    lr = 0.5
    config = tiny_config(**{"arch.order": "second", "optim.lr": lr,
                            "optim.lr_min": lr})
    net = SmoothNet()
    net.build((None, 8, 8, 3))
    step = step_lib.SearchStep(net, config, num_classes=10, image_size=8,
                               steps_per_epoch=10)
    train, valid = batch(3), batch(4)
    rng = np.random.default_rng(5)
    for b in step.w_optimizer.buffers:
        b.assign(rng.normal(0.0, 0.1, b.shape).astype(np.float32))
    w_vars, alpha = net.weight_variables, net.arch_variables
    w0 = values(w_vars)

    out = step.arch_direction(valid, train, tf.constant(lr),
                              tf.constant([0, 0], tf.int32))
    fd = np.concatenate([d.numpy().ravel() for d in out["direction"]])
    for v, x in zip(w_vars, w0):  # restored exactly
        np.testing.assert_array_equal(v.numpy(), x)

    # Exact: d/dalpha L_val(w'(alpha), alpha) through the virtual step.
    sgd = step.w_optimizer
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = obj_lib.cross_entropy(net(train[0]), train[1])
        g_train = inner.gradient(loss, w_vars)
        w_virtual = [w - lr * (sgd.momentum * b + g + sgd.weight_decay * w)
                     for w, b, g in zip(w_vars, sgd.buffers, g_train)]
        with keras.StatelessScope(state_mapping=list(zip(w_vars, w_virtual))):
            val_loss = obj_lib.cross_entropy(net(valid[0]), valid[1])
    exact = np.concatenate(
        [g.numpy().ravel() for g in outer.gradient(val_loss, alpha)])
    # The partial derivative alone (w' held fixed) isolates the implicit
    # term that the finite differences approximate.
    w_fixed = [tf.constant(w.numpy()) for w in w_virtual]
    with tf.GradientTape() as tape:
        with keras.StatelessScope(state_mapping=list(zip(w_vars, w_fixed))):
            val_loss = obj_lib.cross_entropy(net(valid[0]), valid[1])
    partial = np.concatenate(
        [g.numpy().ravel() for g in tape.gradient(val_loss, alpha)])

    implicit_fd, implicit_exact = fd - partial, exact - partial
    assert np.linalg.norm(implicit_exact) > 0.1 * np.linalg.norm(exact)
    cosine = implicit_fd @ implicit_exact / (
        np.linalg.norm(implicit_fd) * np.linalg.norm(implicit_exact))
    assert cosine > 0.99
    np.testing.assert_allclose(fd, exact, rtol=0.0,
                               atol=0.02 * np.abs(exact).max())


def test_second_order_step_on_the_supernet_is_finite(eager):
    config = tiny_config(**{"arch.order": "second",
                            "objectives": ["acc", "adv", "params"]})
    net, step = make_step(config)
    metrics = step(batch(3), batch(4))
    assert float(metrics["skipped"]) == 0.0
    weights = [float(metrics[f"weight/{n}"]) for n in ("acc", "adv", "params")]
    assert abs(sum(weights) - 1.0) < 1e-5


def test_fixed_weights_use_the_first_objectives_gradient(eager):
    train, valid = batch(6), batch(7)
    net_a, step_a = make_step(tiny_config(**{
        "objectives": ["acc", "params"], "combine.method": "fixed",
        "combine.weights": [1.0, 0.0], "combine.normalization": "none"}))
    metrics = step_a(train, valid)
    net_b, step_b = make_step(tiny_config())
    step_b(train, valid)
    assert float(metrics["weight/params"]) == 0.0
    assert float(metrics["objective/params"]) > 0.0
    for a, b in zip(values(net_a.arch_variables), values(net_b.arch_variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_objective_start_leaves_an_objective_out_until_its_epoch(eager):
    """adv starting at epoch 1 (the authors' adv_later): during epoch 0 the
    step is exactly the step without adv; from epoch 1 adv is combined."""
    train, valid = batch(12), batch(13)
    late = tiny_config(**{"objectives": ["acc", "adv", "params"],
                          "objective_start.adv": 1})
    net_a, step_a = make_step(late)
    net_b, step_b = make_step(tiny_config(objectives=["acc", "params"]))
    assert step_a.active_objectives() == ("acc", "params")
    metrics = step_a(train, valid)
    step_b(train, valid)
    assert float(metrics["active/adv"]) == 0.0
    assert float(metrics["weight/adv"]) == 0.0
    assert float(metrics["objective/adv"]) == 0.0
    assert "active/acc" not in metrics  # only late objectives report it
    for a, b in zip(values(net_a.variables), values(net_b.variables)):
        np.testing.assert_array_equal(a, b)
    # Epoch 1 (steps_per_epoch=10): adv joins.
    step_a.iterations.assign(10)
    assert step_a.active_objectives() == ("acc", "adv", "params")
    metrics = step_a(train, valid)
    assert float(metrics["active/adv"]) == 1.0
    assert float(metrics["objective/adv"]) > 0.0
    weights = [float(metrics[f"weight/{n}"]) for n in ("acc", "adv", "params")]
    assert abs(sum(weights) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="objective_start.adv"):
        make_step(tiny_config(**{"objectives": ["acc", "adv"],
                                 "objective_start.adv": -1}))


def test_ood_objective_and_lower_level_term(eager):
    """The ood objective is upper_scale * KL(U || softmax) on the OOD batch;
    its lower-level weight changes the weights' update."""
    train, valid = batch(14), batch(15)
    ood_images = batch(16)[0]
    cfg = tiny_config(**{"objectives": ["acc", "ood"],
                         "ood.upper_scale": 10.0, "ood.lower_weight": 1.0})
    net, step = make_step(cfg)
    expected = 10.0 * float(obj_lib.ood_kl(net(ood_images, training=True)))
    metrics = step(train, valid, ood_images)
    assert float(metrics["skipped"]) == 0.0
    assert float(metrics["objective/ood"]) == pytest.approx(expected,
                                                            rel=1e-5)
    w_with = values(net.weight_variables)
    net_b, step_b = make_step(tiny_config(**{
        "objectives": ["acc", "ood"], "ood.upper_scale": 10.0,
        "ood.lower_weight": 0.0}))
    step_b(train, valid, ood_images)
    # Same alpha update (the upper level is identical) ...
    for a, b in zip(values(net.arch_variables),
                    values(net_b.arch_variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    # ... but the lower-level KL term moved the weights elsewhere.
    assert any(not np.allclose(a, b) for a, b in
               zip(w_with, values(net_b.weight_variables)))
    with pytest.raises(ValueError, match="ood_images"):
        step(train, valid)


def test_ood_lower_ramp_is_epoch_over_epochs(eager):
    """The authors' "oodS" runs: lower weight * epoch/epochs, so the first
    epoch trains the weights without the KL term."""
    train, valid, ood_images = batch(19), batch(20), batch(21)[0]
    ramp = tiny_config(**{"objectives": ["acc"], "ood.lower_weight": 1.0,
                          "ood.lower_ramp": True, "epochs": 4})
    net, step = make_step(ramp)
    assert float(step.ood_lower_weight_at(tf.constant(0, tf.int64))) == 0.0
    # steps_per_epoch=10: step 25 is in epoch 2 of 4.
    assert float(step.ood_lower_weight_at(tf.constant(25, tf.int64))) \
        == pytest.approx(0.5)
    step(train, valid, ood_images)
    net_b, step_b = make_step(tiny_config(**{"objectives": ["acc"],
                                              "epochs": 4}))
    step_b(train, valid)
    for a, b in zip(values(net.weight_variables),
                    values(net_b.weight_variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_step_reports_the_derived_genotypes_size(eager):
    config = tiny_config(objectives=["acc", "params"])
    net, step = make_step(config)
    metrics = step(batch(17), batch(18))
    genotype = search.derive_genotype(net, config)
    assert float(metrics["derived/params"]) == pytest.approx(
        search.genotype_params(genotype, step.report_table,
                               config.model.primitives), rel=1e-6)


def test_nonfinite_batch_skips_the_step(eager):
    config = tiny_config(objectives=["acc", "params"])
    net, step = make_step(config)
    train, (xv, yv) = batch(8), batch(9)
    bad = tf.tensor_scatter_nd_update(xv, [[0, 0, 0, 0]], [np.nan])
    before = values(net.variables) + values(step.variables)

    for i in range(2):
        metrics = step(train, (bad, yv))
        assert float(metrics["skipped"]) == 1.0
        assert float(metrics["nonfinite/acc"]) == 1.0
        assert float(metrics["nonfinite/params"]) == 0.0
        assert float(metrics["consecutive_skips"]) == i + 1
    after = values(net.variables) + values(step.variables)
    changed = [a for a, b in zip(after, before) if not np.array_equal(a, b)]
    # Only the step counter and the skip counter moved.
    assert len(changed) == 2
    metrics = step(train, (xv, yv))
    assert float(metrics["skipped"]) == 0.0
    assert float(metrics["consecutive_skips"]) == 0.0


def test_mixed_bfloat16_step_is_finite_with_float32_alpha(eager):
    config = tiny_config(mixed_precision="mixed_bfloat16",
                         objectives=("acc", "params"))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        net, step = make_step(config)
        metrics = step(batch(10), batch(11))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["skipped"]) == 0.0
    assert "loss_scale" not in metrics  # no loss scale for bfloat16
    for a in net.arch_variables:
        assert a.dtype == "float32"
    assert net.weight_variables[0].dtype == "float32"


def test_run_stops_after_consecutive_skips(eager, tmp_path, monkeypatch):
    real = search.data_lib.batches

    def nan_batches(*args, **kwargs):
        return real(*args, **kwargs).map(
            lambda x, y: (x * np.float32(np.nan), y))

    monkeypatch.setattr(search.data_lib, "batches", nan_batches)
    config = tiny_config(max_consecutive_skips=2, steps_per_epoch=3)
    with pytest.raises(step_lib.SearchDivergedError,
                       match="2 consecutive steps.*acc"):
        search.search(config, str(tmp_path), log=lambda _: None)


@pytest.mark.slow
def test_short_search_params_objective_shrinks_the_network(tmp_path):
    common = {"epochs": 3, "steps_per_epoch": 8, "arch.lr": 3e-3}
    acc = search.search(tiny_config(**common), str(tmp_path / "acc"),
                        log=lambda _: None)
    small = search.search(
        tiny_config(objectives=["acc", "params"], **common),
        str(tmp_path / "params"), log=lambda _: None)

    def expected(workdir):
        with np.load(os.path.join(workdir, "alpha_history.npz")) as f:
            w = [tf.nn.softmax(f[k][-1]) for k in ("alpha_normal",
                                                   "alpha_reduce")]
        table = resources.measured_table(
            "params", channels=8, layers=5, num_classes=10, image_size=8,
            steps=2, multiplier=2, primitives=PRIMITIVES)
        return float(resources.expected_cost(*w, table))

    assert expected(small["workdir"]) < expected(acc["workdir"])
    assert small["genotype_params"] <= acc["genotype_params"]

    steps = [json.loads(line) for line in
             open(tmp_path / "acc" / "metrics.jsonl")]
    val = [s["objective/acc"] for s in steps if s["kind"] == "step"]
    assert np.mean(val[-6:]) < np.mean(val[:6])


def run_cli(*flags, config="configs/search_demo.py"):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "e2rnas_tf", "search", f"--config={config}",
         *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_published_preset_runs_end_to_end(tmp_path):
    """The authors' run at a tiny scale: five objectives (OOD from noise),
    second order, their solver and cost models, the OOD ramp."""
    workdir = str(tmp_path / "published")
    result = run_cli(
        f"--workdir={workdir}", "--config.epochs=1",
        "--config.steps_per_epoch=3", "--config.model.layers=3",
        "--config.model.channels=4", "--config.data.image_size=8",
        "--config.batch_size=8", "--config.data.num_train=64",
        "--config.data.num_test=16", "--config.eval_batch_size=16",
        "--config.ood.num_images=24", "--config.log_every=1",
        config="configs/search_e2rnas_published.py:cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in
             open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r for r in lines if r["kind"] == "step"]
    assert len(steps) == 3 and not any(r["skipped"] for r in steps)
    names = ("acc", "adv", "params", "ood", "flops")
    for r in steps:
        weights = [r[f"weight/{n}"] for n in names]
        # The authors' solver: +1e-7 on each weight, none exactly 0.
        assert min(weights) >= 1e-7
        assert sum(weights) == pytest.approx(1.0 + 5e-7, abs=1e-6)
        assert all(np.isfinite(r[f"objective/{n}"]) for n in names)
        # Their units: near 2.358 (x1e5) and 2.843 (x1e8) at the start.
        assert 2.0 < r["cost/params"] < 2.8 and 2.4 < r["cost/flops"] < 3.3
        assert r["objective/params"] == pytest.approx(
            abs(4.0 - r["cost/params"]), rel=1e-5)
        assert r["derived/params"] > 0
    assert "derived" in result.stdout and "M |" in result.stdout
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["arch"]["order"] == "second"
    assert saved["ood"]["name"] == "noise"
    assert saved["ood"]["lower_weight"] == 1.0
    assert not saved["ood"]["lower_ramp"]


def test_cli_end_to_end(tmp_path):
    workdir = str(tmp_path / "run")
    flags = [f"--workdir={workdir}", "--config.epochs=1",
             "--config.steps_per_epoch=2", *TINY_FLAGS]
    result = run_cli(*flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled in" in result.stdout
    assert "expected parameters:" in result.stdout
    # The derived genotype's size on every progress line.
    progress = [l for l in result.stdout.splitlines()
                if l.startswith("epoch ") and " step " in l]
    assert len(progress) == 2 and all(" | derived " in l for l in progress)
    assert progress[-1].endswith("| 100% ETA 0:00")

    genotype = genotypes.Genotype.load(os.path.join(workdir, "genotype.json"))
    assert genotype.steps == 2
    assert genotype == genotypes.Genotype.load(
        os.path.join(workdir, "genotypes", "epoch_001.json"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["layers"] == 3
    lines = [json.loads(line) for line in
             open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r for r in lines if r["kind"] == "step"]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2] and len(epochs) == 1
    for name in ("acc", "adv", "params"):
        assert np.isfinite(steps[-1][f"objective/{name}"])
    assert all(r["derived/params"] > 0 for r in steps)
    assert f"{steps[-1]['derived/params']:.2f}M" in progress[-1]
    weights = [steps[-1][f"weight/{n}"] for n in ("acc", "adv", "params")]
    assert abs(sum(weights) - 1.0) < 1e-5 and min(weights) >= 0.0
    assert 0.0 <= epochs[0]["eval_acc"] <= 1.0
    assert epochs[0]["genotype_params"] > 0.0
    with np.load(os.path.join(workdir, "alpha_history.npz")) as f:
        assert f["alpha_normal"].shape == (1, 5, 4)
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    _check_search_tensorboard(os.path.join(workdir, "tb"), steps=2)
    plots = sorted(os.listdir(os.path.join(workdir, "plots")))
    for name in ("alpha_normal.png", "alpha_reduce.png", "metrics.png"):
        assert name in plots
    assert any(p.endswith(".svg") for p in plots)
    assert all(os.path.getsize(os.path.join(workdir, "plots", p)) > 1000
               for p in plots)

    # A different config in the same workdir is refused, and nothing is
    # touched.
    before = open(os.path.join(workdir, "config.json")).read()
    result = run_cli(*flags, "--config.seed=1")
    assert result.returncode == 2
    assert "holds another run (seed: 0 there, 1 here)" in result.stderr
    assert "--overwrite" in result.stderr
    assert open(os.path.join(workdir, "config.json")).read() == before


def _check_search_tensorboard(tb_dir, steps):
    """The search's event file, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        tb_dir, size_guidance={event_accumulator.TENSORS: 0,
                               event_accumulator.IMAGES: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {}
    for tag in tags["tensors"]:
        values = [(e.step, tf.make_ndarray(e.tensor_proto))
                  for e in acc.Tensors(tag)]
        if values and values[0][1].ndim == 0 and values[0][1].dtype.kind == "f":
            scalars[tag] = [(step, float(v)) for step, v in values]
    for tag in ("objective/acc", "weight/adv", "lr", "arch/entropy_normal",
                "arch/entropy_reduce", "arch/skip_connections_normal",
                "derived/params"):
        # (The epoch summaries repeat the entropy at the epoch's last step.)
        assert sorted({step for step, _ in scalars[tag]}) == list(
            range(1, steps + 1)), tag
        assert all(np.isfinite(v) for _, v in scalars[tag]), tag
    # Near-uniform alpha after 2 steps: entropy close to log(4 ops).
    assert abs(scalars["arch/entropy_normal"][-1][1] - np.log(4)) < 0.05
    assert scalars["derived/params"][-1][1] > 0
    images = [t for t in tags["tensors"] if "alpha" in t or "cell" in t]
    assert images, tags["tensors"]


# The search step under a 2-replica MirroredStrategy (alpha bit-identical
# on both replicas, equal to the single-device step) and under two
# MultiWorkerMirroredStrategy workers: tests/test_distributed.py.


def test_resume_drops_metric_lines_after_the_checkpoint(tmp_path):
    # A run killed between checkpoints wrote lines the resumed run repeats.
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "step", "step": s, "epoch": 1 + (s - 1) // 3}
             for s in range(1, 8)]
    lines.insert(3, {"kind": "epoch", "epoch": 1})
    lines.insert(7, {"kind": "epoch", "epoch": 2})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines)
                    + '{"kind": "step", "st')  # cut short by the kill
    metrics.MetricsLog(str(path), keep=search.covered(4, 1)).close()
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in lines if (r["kind"] == "step" and r["step"] <= 4)
                    or (r["kind"] == "epoch" and r["epoch"] <= 1)]
    assert [r.get("step") for r in kept] == [1, 2, 3, None, 4]


# ---------------------------------------------------------------------------
# A config the data reject leaves the workdir alone; a non-finite gradient
# (not a batch) in one objective skips its steps.


def _tree(root):
    """Every file under ``root`` with its bytes."""
    return {os.path.relpath(os.path.join(d, n), root):
            open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def _image_folder(root, per_class=8):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for name in ("a", "b"):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(count):
                png = tf.io.encode_png(
                    rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
                with open(os.path.join(folder, f"{i}.png"), "wb") as f:
                    f.write(png.numpy())
    return root


def test_data_error_leaves_the_workdir_unwritten(tmp_path):
    workdir = str(tmp_path / "run")
    common = {"data.name": "folder", "data.num_train": 0,
              "data.num_test": 0, "batch_size": 4, "eval_batch_size": 4,
              "epochs": 1, "steps_per_epoch": 1}
    bad = tiny_config(**common, **{"data.root": "/nonexistent/data"})
    with pytest.raises(search.data_lib.DataError, match="does not exist"):
        search.search(bad, workdir, log=lambda _: None)
    assert not os.path.exists(os.path.join(workdir, "config.json"))

    # The corrected config runs in the same workdir without --overwrite.
    root = _image_folder(str(tmp_path / "images"))
    good = tiny_config(**common, **{"data.root": root})
    result = search.search(good, workdir, log=lambda _: None)
    assert result["steps"] == 1
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["root"] == root
    before = _tree(workdir)

    # The same mistake over the finished run, even with --overwrite: one
    # line, exit 2, and the run's files byte for byte as they were.
    result = run_cli(f"--workdir={workdir}", "--overwrite", *TINY_FLAGS,
                     "--config.data.name=folder",
                     "--config.data.root=/nonexistent/data",
                     "--config.data.num_train=0", "--config.data.num_test=0")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines()
             if line.startswith("e2rnas") or "Traceback" in line]
    assert lines == ["e2rnas search: error: Data root /nonexistent/data "
                     "does not exist or is not a folder"], result.stderr
    assert _tree(workdir) == before


def _poison_alpha_gradient(monkeypatch, objective, bad_steps):
    """Makes ``objective``'s gradient w.r.t. alpha NaN (its value stays
    finite) at the steps whose counter (0-based, read in the graph) is in
    ``bad_steps``."""
    bad = tf.constant(sorted(bad_steps), tf.int64)

    def factor(step):
        hit = tf.reduce_any(tf.equal(step.iterations.read_value(), bad))
        return tf.where(hit, tf.constant(np.nan, tf.float32), 1.0)

    if objective in step_lib.NETWORK_OBJECTIVES:
        real = step_lib.SearchStep._network_loss_grads

        def poisoned(self, images, labels, which, **kwargs):
            loss, logits, grads = real(self, images, labels, which, **kwargs)
            # First order: only the objectives ask for "alpha" ("acc"
            # here; the weight step asks for "w").
            if which == "alpha":
                grads = [g * factor(self) for g in grads]
            return loss, logits, grads

        monkeypatch.setattr(step_lib.SearchStep, "_network_loss_grads",
                            poisoned)
    else:
        real = step_lib.SearchStep._resource_loss_grads

        def poisoned(self, kind, alpha, seed):
            loss, cost, grads = real(self, kind, alpha, seed)
            if kind == objective:
                grads = [g * factor(self) for g in grads]
            return loss, cost, grads

        monkeypatch.setattr(step_lib.SearchStep, "_resource_loss_grads",
                            poisoned)


def _record_steps(monkeypatch):
    """Every step call's variables before and after, and its metrics."""
    calls = []
    real = step_lib.SearchStep.__call__

    def state(step):
        counters = {id(step.iterations), id(step.consecutive_skips)}
        return ([v.numpy().copy() for v in step.network.variables],
                [v.numpy().copy() for v in step.variables
                 if id(v) not in counters])

    def alpha(step):
        return [a.numpy().copy() for a in step.network.arch_variables]

    def recording(self, train_batch, valid_batch, ood_images=None):
        before, alpha_before = state(self), alpha(self)
        out = real(self, train_batch, valid_batch, ood_images)
        calls.append({"before": before, "after": state(self),
                      "alpha_before": alpha_before, "alpha": alpha(self),
                      "metrics": {k: float(v) for k, v in out.items()}})
        return out

    monkeypatch.setattr(step_lib.SearchStep, "__call__", recording)
    return calls


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


@pytest.mark.parametrize("objective", ["params", "acc"])
def test_nonfinite_alpha_gradient_skips_steps_then_stops(
        tmp_path, monkeypatch, objective):
    other = "acc" if objective == "params" else "params"
    # Steps 1, 3 and 4 (0-based) are poisoned: 1 is skipped alone, 3 and 4
    # reach max_consecutive_skips=2 and stop the run.
    with monkeypatch.context() as patch:
        _poison_alpha_gradient(patch, objective, {1, 3, 4})
        calls = _record_steps(patch)
        config = tiny_config(objectives=["acc", "params"], epochs=1,
                             steps_per_epoch=8, max_consecutive_skips=2)
        lines = []
        workdir = str(tmp_path / "run")
        with pytest.raises(step_lib.SearchDivergedError,
                           match=f"2 consecutive steps.*objectives: "
                                 f"{objective}\\)"):
            search.search(config, workdir, log=lines.append)

    assert len(calls) == 5
    skipped = [c["metrics"]["skipped"] for c in calls]
    assert skipped == [0.0, 1.0, 0.0, 1.0, 1.0]
    for c in calls:
        bad = c["metrics"]["skipped"] == 1.0
        assert c["metrics"][f"nonfinite/{objective}"] == float(bad)
        assert c["metrics"][f"nonfinite/{other}"] == 0.0
        assert c["metrics"]["nonfinite/train"] == 0.0
        # Its value stayed finite: only the gradient was poisoned.
        assert np.isfinite(c["metrics"][f"objective/{objective}"])
        if bad:  # alpha, w, batch-norm statistics, optimizer slots
            assert _same(c["before"], c["after"])
        else:
            assert not any(np.array_equal(a, b) for a, b in
                           zip(c["alpha_before"], c["alpha"]))
            assert not _same(c["before"], c["after"])
    assert [c["metrics"]["consecutive_skips"] for c in calls] == [
        0.0, 1.0, 0.0, 1.0, 2.0]

    records = [json.loads(line) for line in
               open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r[f"nonfinite/{objective}"] for r in records] == [
        0.0, 1.0, 0.0, 1.0, 1.0]
    assert [r["skipped"] for r in records] == skipped
    assert f"step 2 skipped: non-finite {objective} (1 in a row)" in lines
    assert f"step 5 skipped: non-finite {objective} (2 in a row)" in lines
    assert any(line.startswith("last finite state saved in ")
               for line in lines)

    # The checkpoint left behind holds the last finite state and loads: the
    # same command (now with finite gradients) resumes from it and ends.
    calls_resumed = []
    with monkeypatch.context() as patch:
        calls_resumed = _record_steps(patch)
        result = search.search(config, workdir, log=lambda _: None)
    assert result["steps"] == 8
    assert _same(calls_resumed[0]["before"], calls[-1]["after"])
    assert _same(calls[-1]["after"], calls[2]["after"])
