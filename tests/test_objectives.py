"""Tests for e2rnas_tf.search.objectives: losses, attacks and the OOD term,
against analytic, NumPy and finite-difference references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf import config_lib
from e2rnas_tf.search import objectives
from e2rnas_tf.space import search_space

EPS = 8.0 / 255.0


# ---------------------------------------------------------------------------
# Losses.


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_and_accuracy_against_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(6, 5).astype(np.float32) * 3
    labels = rng.randint(0, 5, 6)
    expected = -_log_softmax(logits.astype(np.float64))[np.arange(6), labels]
    ce = objectives.cross_entropy(tf.constant(logits, tf.float16), labels)
    assert ce.dtype == tf.float32
    np.testing.assert_allclose(float(ce), expected.mean(), rtol=2e-3)
    np.testing.assert_allclose(
        float(objectives.cross_entropy(logits, labels)), expected.mean(),
        rtol=1e-6)
    acc = objectives.accuracy(logits, labels)
    assert acc.dtype == tf.float32
    assert float(acc) == pytest.approx(np.mean(logits.argmax(-1) == labels))


# ---------------------------------------------------------------------------
# Attacks on a linear model, where the input gradient is known in closed form.

SHAPE = (8, 4, 4, 3)


def _linear_problem(seed=0, classes=2):
    """Images, labels and a linear model ``logits = flat(x) @ w``.

    Every column difference of ``w`` is at least 0.1 in magnitude, so the
    input gradient's sign never hinges on round-off.
    """
    rng = np.random.RandomState(seed)
    dim = int(np.prod(SHAPE[1:]))
    w = rng.randn(dim, classes)
    w[:, 1] = w[:, 0] + np.sign(rng.randn(dim)) * rng.uniform(0.1, 1.0, dim)
    images = rng.uniform(0.0, 1.0, SHAPE).astype(np.float32)
    images[0, 0, 0] = [0.0, 1.0, 0.005]  # pixels at and near the bounds
    labels = rng.randint(0, classes, SHAPE[0]).astype(np.int32)
    w_var = tf.Variable(w.astype(np.float32))

    def model_fn(x):
        return tf.matmul(tf.reshape(x, [tf.shape(x)[0], -1]), w_var)

    return images, labels, w_var, model_fn


def _input_grad_sign(images, labels, w):
    """sign of d CE / d x for the linear model, from p - onehot (NumPy)."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    logits = flat @ w
    p = np.exp(_log_softmax(logits))
    p[np.arange(len(labels)), labels] -= 1.0
    return np.sign(p @ w.T).reshape(images.shape)


def test_fgsm_is_one_signed_step_without_random_start():
    images, labels, w, model_fn = _linear_problem()
    adv = objectives.fgsm(model_fn, images, labels, eps=EPS, step_size=EPS,
                          random_start=False, seed=tf.constant([0, 0]))
    sign = _input_grad_sign(images, labels, w.numpy())
    expected = np.clip(images + EPS * sign, 0.0, 1.0)
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-7)
    assert adv.dtype == tf.float32


def test_fgsm_random_start_direction_and_bounds():
    # With two classes the gradient sign is sign(p1 - y1) * (w1 - w0), the
    # same at every point, so the step is known wherever the start lands.
    images, labels, w, model_fn = _linear_problem()
    sign = _input_grad_sign(images, labels, w.numpy())
    for seed in range(3):
        seed = tf.constant([seed, 7])
        # A zero step returns the projected random start itself.
        start = objectives.fgsm(model_fn, images, labels, eps=EPS,
                                step_size=0.0, seed=seed).numpy() - images
        adv = objectives.fgsm(model_fn, images, labels, eps=EPS,
                              step_size=1.25 * EPS, seed=seed).numpy()
        assert np.all(np.abs(adv - images) <= EPS + 1e-7)
        assert adv.min() >= 0.0 and adv.max() <= 1.0
        expected = np.clip(
            images + np.clip(start + 1.25 * EPS * sign, -EPS, EPS), 0, 1)
        np.testing.assert_allclose(adv, expected, atol=1e-6)
        # From any start the step ends at least 0.25 eps along the sign,
        # unless the image bound comes first.
        room = np.where(sign > 0, 1.0 - images, images)
        assert np.all((adv - images) * sign
                      >= np.minimum(0.25 * EPS, room) - 1e-6)


def test_fgsm_small_step_keeps_random_start():
    images, labels, w, model_fn = _linear_problem()
    sign = _input_grad_sign(images, labels, w.numpy())
    seed = tf.constant([3, 4])
    start = objectives.fgsm(model_fn, images, labels, eps=EPS, step_size=0.0,
                            seed=seed).numpy()
    adv = objectives.fgsm(model_fn, images, labels, eps=EPS,
                          step_size=0.25 * EPS, seed=seed).numpy()
    # A zero step returns the (projected) random start, which is spread
    # over the ball; a small step then moves along the gradient sign only.
    spread = np.abs(start - images)
    assert spread.max() > 0.8 * EPS and np.median(spread) < 0.7 * EPS
    moved = adv - start
    assert np.all(moved * sign >= -1e-7)
    assert np.mean(np.abs(moved) > 1e-4) > 0.5
    assert np.all(np.abs(adv - images) <= EPS + 1e-7)


def test_fgsm_gradient_at_clean_is_the_authors_variant():
    """The authors' upper-level FGSM: the step's sign comes from the
    gradient at the clean image, added to the random start."""
    images, labels, w, model_fn = _linear_problem(seed=2, classes=10)
    seed = tf.constant([5, 6])
    start = objectives.fgsm(model_fn, images, labels, eps=EPS, step_size=0.0,
                            seed=seed).numpy() - images
    sign_clean = _input_grad_sign(images, labels, w.numpy())
    clean = objectives.fgsm(model_fn, images, labels, eps=EPS,
                            step_size=1.25 * EPS, seed=seed,
                            gradient_at="clean").numpy()
    np.testing.assert_allclose(
        clean,
        np.clip(images + np.clip(start + 1.25 * EPS * sign_clean, -EPS, EPS),
                0, 1), atol=1e-6)
    # With ten classes the sign depends on the point: the default variant
    # (gradient at the start) differs on some pixels.
    sign_start = _input_grad_sign(images + start, labels, w.numpy())
    assert np.any(sign_start != sign_clean)
    ours = objectives.fgsm(model_fn, images, labels, eps=EPS,
                           step_size=1.25 * EPS, seed=seed).numpy()
    assert np.any(np.abs(ours - clean) > 1e-6)
    with pytest.raises(ValueError, match="gradient_at"):
        objectives.fgsm(model_fn, images, labels, eps=EPS, step_size=EPS,
                        seed=seed, gradient_at="end")
    cfg = config_lib.attack_config(name="pgd", steps=2, gradient_at="clean")
    with pytest.raises(ValueError, match="gradient_at='start' for PGD"):
        objectives.attack(model_fn, images, labels, cfg, seed)


def test_ood_kl_against_numpy():
    """PyTorch's F.kl_div(log_softmax(z), uniform) with its element-wise
    mean: mean over n, k of (1/K)(log(1/K) - log p_nk)."""
    rng = np.random.RandomState(1)
    logits = rng.randn(6, 10).astype(np.float32) * 2
    log_p = _log_softmax(logits.astype(np.float64))
    expected = np.mean((1 / 10) * (np.log(1 / 10) - log_p))
    assert float(objectives.ood_kl(logits)) == pytest.approx(expected,
                                                             rel=1e-5)
    # Per example it is KL(U || p) / K, zero for uniform answers.
    kl = np.sum((1 / 10) * (np.log(1 / 10) - log_p), axis=1)
    assert expected == pytest.approx(kl.mean() / 10)
    assert float(objectives.ood_kl(tf.zeros([4, 10]))) == pytest.approx(0.0,
                                                                        abs=1e-7)
    assert objectives.ood_kl(tf.constant(logits, tf.float16)).dtype \
        == tf.float32


def test_attacks_are_deterministic_in_the_seed():
    images, labels, _, model_fn = _linear_problem()
    for attack in (objectives.fgsm, objectives.pgd):
        kwargs = dict(eps=EPS, step_size=0.5 * EPS)
        if attack is objectives.pgd:
            kwargs["steps"] = 1
        run = lambda s: attack(model_fn, images, labels,  # noqa: E731
                               seed=tf.constant(s), **kwargs).numpy()
        np.testing.assert_array_equal(run([1, 2]), run([1, 2]))
        assert np.abs(run([1, 2]) - run([1, 3])).max() > 0.1 * EPS


@pytest.mark.parametrize("compiled", [False, True])
def test_adversarial_images_carry_no_gradient(compiled):
    images, labels, w, model_fn = _linear_problem()
    x = tf.constant(images)

    def step(cfg):
        # The attack runs under the outer tape, as in a search step.
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            adv = objectives.attack(model_fn, x, labels, cfg,
                                    tf.constant([0, 1]))
            loss = objectives.cross_entropy(model_fn(adv), labels)
        paths = tape.gradient(tf.reduce_sum(adv), [x, w])
        return adv, paths, tape.gradient(loss, w)

    for name in ("fgsm", "pgd"):
        cfg = config_lib.attack_config(name=name, eps=8.0, steps=2)
        if compiled:
            adv, paths, grad = tf.function(lambda: step(cfg),
                                           autograph=False)()
        else:
            adv, paths, grad = step(cfg)
        # No path from the adversarial images back to x or w ...
        assert paths == [None, None]
        # ... so the loss gradient is that of a fixed input (manual).
        flat = adv.numpy().reshape(len(images), -1).astype(np.float64)
        p = np.exp(_log_softmax(flat @ w.numpy().astype(np.float64)))
        p[np.arange(len(labels)), labels] -= 1.0
        manual = flat.T @ p / len(labels)
        np.testing.assert_allclose(grad.numpy(), manual, rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_attacks_compile(jit):
    images, labels, _, model_fn = _linear_problem()
    cfgs = [config_lib.attack_config(name="fgsm", eps=8.0),
            config_lib.attack_config(name="pgd", eps=8.0, steps=3)]
    def compile_attack(cfg):
        return tf.function(
            lambda x, y, s: objectives.attack(model_fn, x, y, cfg, s),
            autograph=False, jit_compile=jit)

    seed = tf.constant([5, 6], tf.int64)
    for cfg in cfgs:
        compiled = compile_attack(cfg)
        eager = objectives.attack(model_fn, images, labels, cfg, seed).numpy()
        adv = compiled(images, labels, seed).numpy()
        np.testing.assert_array_equal(compiled(images, labels, seed).numpy(),
                                      adv)
        if not jit:
            np.testing.assert_allclose(adv, eager, atol=1e-6)
        else:
            # XLA may draw another random start from the same seed (TF
            # does not promise equal streams), so only the bounds and the
            # run-to-run determinism above are checked here.
            assert np.all(np.abs(adv - images) <= EPS + 1e-6)
            assert adv.min() >= 0.0 and adv.max() <= 1.0
    # Without a random start, compiled and eager attacks agree exactly.
    for cfg in cfgs:
        cfg = config_lib.attack_config(**{**cfg.to_dict(),
                                          "random_start": False})
        np.testing.assert_allclose(
            compile_attack(cfg)(images, labels, seed).numpy(),
            objectives.attack(model_fn, images, labels, cfg, seed).numpy(),
            atol=1e-6)


def test_attack_compiles_on_a_conv_model_with_xla():
    rng = np.random.RandomState(1)
    kernel = tf.constant(rng.randn(3, 3, 3, 4).astype(np.float32))
    dense = tf.constant(rng.randn(4, 3).astype(np.float32))

    def model_fn(x):
        h = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
        return tf.matmul(tf.reduce_mean(h, [1, 2]), dense)

    images = rng.uniform(size=SHAPE).astype(np.float32)
    labels = rng.randint(0, 3, SHAPE[0])
    cfg = config_lib.attack_config(name="pgd", eps=4.0, steps=2)
    fn = tf.function(
        lambda x, y, s: objectives.attack(model_fn, x, y, cfg, s),
        autograph=False, jit_compile=True)
    adv = fn(images, labels, tf.constant([0, 0])).numpy()
    assert np.all(np.abs(adv - images) <= 4.0 / 255 + 1e-6)
    assert np.abs(adv - images).max() > 1.0 / 255


def test_attack_dispatch_and_default_step_sizes():
    images, labels, w, model_fn = _linear_problem()
    sign = _input_grad_sign(images, labels, w.numpy())
    seed = tf.constant([0, 0])
    eps = 8.0 / 255
    # fgsm: default step 1.25 eps from the centre is clipped to eps.
    cfg = config_lib.attack_config(name="fgsm", eps=8.0, random_start=False)
    adv = objectives.attack(model_fn, images, labels, cfg, seed).numpy()
    np.testing.assert_allclose(adv, np.clip(images + eps * sign, 0, 1),
                               atol=1e-6)
    # pgd: default step eps / 4, so two steps reach eps / 2.
    cfg = config_lib.attack_config(name="pgd", eps=8.0, steps=2,
                                   random_start=False)
    adv = objectives.attack(model_fn, images, labels, cfg, seed).numpy()
    np.testing.assert_allclose(adv, np.clip(images + 0.5 * eps * sign, 0, 1),
                               atol=1e-6)
    # An explicit step size is in /255 units too.
    cfg = config_lib.attack_config(name="pgd", eps=8.0, steps=1,
                                   step_size=2.0, random_start=False)
    adv = objectives.attack(model_fn, images, labels, cfg, seed).numpy()
    np.testing.assert_allclose(adv, np.clip(images + 2 / 255 * sign, 0, 1),
                               atol=1e-6)
    cfg = config_lib.attack_config(name="cw")
    with pytest.raises(ValueError, match="attack name"):
        objectives.attack(model_fn, images, labels, cfg, seed)
    with pytest.raises(ValueError, match="steps"):
        objectives.pgd(model_fn, images, labels, eps=eps, step_size=eps,
                       steps=0, seed=seed)
    with pytest.raises(ValueError, match="eps"):
        objectives.fgsm(model_fn, images, labels, eps=-1.0, step_size=eps,
                        seed=seed)


def test_pgd_reaches_the_corner_of_the_ball():
    images, labels, w, model_fn = _linear_problem(seed=2)
    sign = _input_grad_sign(images, labels, w.numpy())
    # 7 steps of eps / 3 cross the ball from any random start.
    adv = objectives.pgd(model_fn, images, labels, eps=EPS,
                         step_size=EPS / 3, steps=7,
                         seed=tf.constant([1, 1])).numpy()
    np.testing.assert_allclose(adv, np.clip(images + EPS * sign, 0, 1),
                               atol=1e-6)


def test_attacks_accept_low_precision_models():
    images, labels, w, model_fn = _linear_problem()
    sign = _input_grad_sign(images, labels, w.numpy())
    # A model whose logits come out in bfloat16, as under mixed precision.
    adv = objectives.fgsm(
        lambda x: tf.cast(model_fn(x), tf.bfloat16),
        tf.constant(images, tf.float16), labels, eps=EPS, step_size=EPS,
        random_start=False, seed=tf.constant([0, 0]))
    assert adv.dtype == tf.float32
    # float16 images round the clean pixels, not the signs.
    np.testing.assert_allclose(adv.numpy(), np.clip(
        images.astype(np.float16).astype(np.float32) + EPS * sign, 0, 1),
        atol=1e-6)


def _mlp(seed):
    rng = np.random.RandomState(seed)
    dim = int(np.prod(SHAPE[1:]))
    w1 = tf.constant(rng.randn(dim, 32).astype(np.float32) * 0.5)
    w2 = tf.constant(rng.randn(32, 10).astype(np.float32))

    def model_fn(x):
        h = tf.tanh(tf.matmul(tf.reshape(x, [tf.shape(x)[0], -1]), w1))
        return tf.matmul(h, w2)

    return model_fn


def test_pgd_is_stronger_than_fgsm():
    rng = np.random.RandomState(0)
    images = rng.uniform(size=(256,) + SHAPE[1:]).astype(np.float32)
    labels = rng.randint(0, 10, 256)
    wins = 0
    for trial in range(3):
        model_fn = _mlp(trial)
        seed = tf.constant([trial, 0])
        clean = objectives.cross_entropy(model_fn(images), labels)
        fgsm = objectives.cross_entropy(model_fn(objectives.fgsm(
            model_fn, images, labels, eps=EPS, step_size=1.25 * EPS,
            seed=seed)), labels)
        pgd = objectives.cross_entropy(model_fn(objectives.pgd(
            model_fn, images, labels, eps=EPS, step_size=EPS / 4, steps=10,
            seed=seed)), labels)
        assert float(fgsm) > float(clean)
        wins += float(pgd) >= float(fgsm)
    assert wins == 3


def test_pgd_stays_in_the_ball_on_a_nonlinear_model():
    model_fn = _mlp(5)
    rng = np.random.RandomState(1)
    images = rng.uniform(size=SHAPE).astype(np.float32)
    images[:2] = np.round(images[:2])  # pixels on the [0, 1] bounds
    labels = rng.randint(0, 10, SHAPE[0])
    adv = objectives.pgd(model_fn, images, labels, eps=EPS, step_size=EPS,
                         steps=4, seed=tf.constant([0, 3])).numpy()
    assert np.all(np.abs(adv - images) <= EPS + 1e-7)
    assert adv.min() >= 0.0 and adv.max() <= 1.0


# ---------------------------------------------------------------------------
# Objective gradients w.r.t. alpha on a tiny supernet.


@pytest.fixture(scope="module")
def tiny():
    """A 3-cell supernet, a batch, and its compiled clean loss.

    The loss takes the images as an argument so that one trace serves
    every objective; the alphas are read as variables at every call.
    Gradients are taken eagerly (tracing the backward pass costs more
    than the two eager gradients these tests need).
    """
    # Seeded weights: whatever ran before in this process, the same net
    # (the finite-difference tolerances hold for it, not for any draw).
    keras.utils.set_random_seed(0)
    net = search_space.SearchNetwork(channels=4, num_classes=10, layers=3,
                                     alpha_seed=0)
    rng = np.random.RandomState(0)
    x = tf.constant(rng.uniform(size=(4, 8, 8, 3)).astype(np.float32))
    y = tf.constant(rng.randint(0, 10, 4).astype(np.int32))
    net(x, training=True)
    loss_fn = tf.function(
        lambda images: objectives.cross_entropy(net(images, training=True), y),
        autograph=False)
    return net, x, y, loss_fn


def _check_against_finite_differences(net, objective, grads):
    """Central differences (float32, h = 1e-3) on a few alpha entries and a
    unit random direction.

    The supernet is far from linear in alpha at this scale (second-order
    terms show at h = 1e-2), so the step is small and the tolerance allows
    for float32 round-off of the loss divided by 2h.
    """
    rng = np.random.RandomState(2)
    alphas = net.arch_variables
    original = [a.numpy() for a in alphas]
    directions = []
    for which in (0, 1):
        for _ in range(2):
            d = [np.zeros((14, 8), np.float32) for _ in alphas]
            d[which][rng.randint(14), rng.randint(8)] = 1.0
            directions.append(d)
    d = [rng.randn(14, 8).astype(np.float32) for _ in alphas]
    norm = np.sqrt(sum((x ** 2).sum() for x in d))
    directions.append([x / norm for x in d])
    h = 1e-3
    fd, analytic = [], []
    try:
        for d in directions:
            values = []
            for sign in (1, -1):
                for a, a0, x in zip(alphas, original, d):
                    a.assign(a0 + sign * h * x)
                values.append(float(objective()))
            fd.append((values[0] - values[1]) / (2 * h))
            analytic.append(sum(float(np.sum(g.numpy() * x))
                                for g, x in zip(grads, d)))
    finally:
        for a, a0 in zip(alphas, original):
            a.assign(a0)
    scale = max(np.abs(analytic).max(), 1e-3)
    np.testing.assert_allclose(fd, analytic, rtol=5e-2, atol=2e-2 * scale)


def test_acc_objective_gradient(tiny):
    net, x, y, loss_fn = tiny
    with tf.GradientTape() as tape:
        loss = objectives.cross_entropy(net(x, training=True), y)
    grads = tape.gradient(loss, net.arch_variables)
    np.testing.assert_allclose(float(loss_fn(x)), float(loss), rtol=1e-5)
    _check_against_finite_differences(net, lambda: loss_fn(x), grads)


def test_adv_objective_gradient(tiny):
    net, x, y, loss_fn = tiny
    cfg = config_lib.attack_config(name="fgsm", eps=8.0)
    seed = tf.constant([4, 2])

    def model_fn(images):
        return net(images, training=True)

    # The gradient holds the perturbation fixed, even when the attack runs
    # under the same tape (it depends on alpha, but is treated as data).
    with tf.GradientTape() as tape:
        adv = objectives.attack(model_fn, x, y, cfg, seed)
        loss = objectives.cross_entropy(model_fn(adv), y)
    grads = tape.gradient(loss, net.arch_variables)
    fixed = tf.constant(adv.numpy())
    with tf.GradientTape() as tape:
        loss_fixed = objectives.cross_entropy(model_fn(fixed), y)
    grads_fixed = tape.gradient(loss_fixed, net.arch_variables)
    for g, g_fixed in zip(grads, grads_fixed):
        np.testing.assert_allclose(g.numpy(), g_fixed.numpy(), rtol=1e-5,
                                   atol=1e-7)
    assert float(loss) > float(loss_fn(x))
    _check_against_finite_differences(net, lambda: loss_fn(fixed), grads)
