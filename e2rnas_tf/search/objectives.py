"""The E2RNAS network objectives as pure functions of tensors.

E2RNAS searches the architecture ``alpha`` against several objectives at
once (combined by MGDA elsewhere). This module holds the ones computed from
the network's outputs: the clean validation cross-entropy (``acc``), the
cross-entropy on adversarial examples (``adv``, with the attacks that make
them) and the out-of-distribution term (``ood``: KL divergence of the
softmax on out-of-distribution images from the uniform distribution). The
resource objectives (``params``, ``flops``) live in `e2rnas_tf.search.resources`.
Nothing here owns a model: losses take logits, attacks take a
``model_fn``.

Where these run: inside the compiled search step (one replica's batch);
they use only stateless random ops and no Python control flow on tensors,
so they trace under ``tf.function(autograph=False)`` and ``jit_compile``.

Reference:
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
    Wong, Rice, Kolter. Fast is better than free: revisiting adversarial
    training. https://arxiv.org/abs/2001.03994
    Madry et al. Towards Deep Learning Models Resistant to Adversarial
    Attacks. https://arxiv.org/abs/1706.06083
    Hendrycks, Mazeika, Dietterich. Deep Anomaly Detection with Outlier
    Exposure. https://arxiv.org/abs/1812.04606
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = [
    "ATTACKS", "GRADIENT_AT", "accuracy", "attack", "cross_entropy", "fgsm",
    "ood_kl", "pgd",
]

ATTACKS = ("fgsm", "pgd")
# Where FGSM takes the input gradient: at the random start (Wong et al.,
# ours) or at the clean image (the E2RNAS authors' code).
GRADIENT_AT = ("start", "clean")


# ---------------------------------------------------------------------------
# Losses.


def cross_entropy(logits, labels):
    """Mean sparse softmax cross-entropy, computed in float32.

    Args:
        logits: ``[N, num_classes]`` logits of any float dtype.
        labels: ``[N]`` integer class indices.

    Returns:
        A float32 scalar.

    Example:

    >>> float(cross_entropy(tf.zeros([2, 4]), tf.constant([0, 3])))  # log 4
    1.386...
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))


def accuracy(logits, labels):
    """Share of examples whose arg-max logit is the label, float32.

    Args:
        logits: ``[N, num_classes]`` logits.
        labels: ``[N]`` integer class indices.

    Returns:
        A float32 scalar in [0, 1].
    """
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    hits = tf.equal(predicted, tf.cast(labels, tf.int32))
    return tf.reduce_mean(tf.cast(hits, tf.float32))


def ood_kl(logits):
    """The E2RNAS out-of-distribution term: KL(uniform || softmax), float32.

    ``mean over examples n and classes k of u (log u - log p_nk)`` with
    ``u = 1 / K``: PyTorch's ``F.kl_div(log_softmax(logits), uniform)``
    with its default element-wise mean, as the authors compute it, which
    is ``KL(U || p_n) / K`` averaged over the batch. It is 0 when the
    network answers every out-of-distribution image with the uniform
    distribution (maximal uncertainty) and grows with its confidence.

    Args:
        logits: ``[N, K]`` logits of out-of-distribution images.

    Returns:
        A float32 scalar.

    Example:

    >>> float(ood_kl(tf.zeros([3, 10])))  # uniform answers
    0.0

    Reference:
        https://arxiv.org/abs/2011.09820 (DARTS/architect.py of the
        authors' code, ``ood_loss``); https://arxiv.org/abs/1812.04606
    """
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.cast(tf.shape(logits)[-1], tf.float32)
    log_u = -tf.math.log(num_classes)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    return tf.reduce_mean(tf.exp(log_u) * (log_u - log_p))


# ---------------------------------------------------------------------------
# Attacks.


def _loss_gradient(model_fn, images, labels):
    """Gradient of the summed cross-entropy w.r.t. the input, float32.

    The sum (not the mean) keeps per-example gradients independent of the
    batch size; only their sign is used.
    """
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = tf.cast(model_fn(images), tf.float32)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=logits))
    return tape.gradient(loss, images)


def _project(images, delta, eps):
    """Clips ``delta`` to the L-inf ball and ``images + delta`` to [0, 1]."""
    delta = tf.clip_by_value(delta, -eps, eps)
    return tf.clip_by_value(images + delta, 0.0, 1.0) - images


def _start(images, eps, random_start, seed):
    if not random_start:
        return tf.zeros_like(images)
    seed = tf.cast(seed, tf.int64)
    # Philox named explicitly rather than left to the device to pick. The
    # start is a deterministic function of the seed in any one execution
    # mode, but XLA draws other numbers than the TF kernels for the same
    # seed: a jit-compiled step and an uncompiled one start elsewhere.
    unit = tf.random.stateless_uniform(
        tf.shape(images), seed=seed, minval=-1.0, maxval=1.0,
        dtype=tf.float32, alg="philox")
    return _project(images, unit * eps, eps)


def _check_budget(name, value):
    # Tensors (e.g. an eps schedule held in a variable) are not checked.
    if isinstance(value, (int, float, np.integer, np.floating)) and value < 0:
        raise ValueError(f"Expected `{name}` >= 0. Received: {name}={value!r}")


def fgsm(model_fn, images, labels, *, eps, step_size, random_start=True,
         seed, gradient_at="start"):
    """Fast gradient sign method with a random start, L-inf, pixels in [0, 1].

    After Wong et al.: start from ``x + delta`` with ``delta`` uniform in
    ``[-eps, eps]`` (clipped so the image stays in [0, 1]), take one step of
    ``step_size`` along the sign of the input gradient of the
    cross-entropy, project back to the eps-ball around ``x`` and to [0, 1].
    The input gradient is taken at the start ``x + delta``
    (``gradient_at="start"``, Wong et al.) or at the clean image ``x``
    (``gradient_at="clean"``: the E2RNAS authors' code, both in the upper
    level and in the first version's adversarial training, which adds the
    random start to a step computed at ``x``).

    The result is wrapped in `tf.stop_gradient`: gradients of a loss on it
    w.r.t. the weights or the architecture treat the adversarial images as
    data, so no gradient flows through the attack. Call it outside the
    tape of the outer update when possible: inside, the tape also records
    the attack's own gradient computation for nothing.

    Args:
        model_fn: maps float32 images ``[N, H, W, C]`` in [0, 1] to logits.
            Side effects (batch-norm moving statistics in training mode)
            happen once per gradient evaluation.
        images: ``[N, H, W, C]`` clean images in [0, 1].
        labels: ``[N]`` integer labels.
        eps: L-inf radius in pixel units (e.g. ``2 / 255``); a float or a
            float32 scalar tensor.
        step_size: signed-gradient step, pixel units (E2RNAS: 1.25 * eps).
        random_start: start at a uniformly random point of the ball.
        seed: ``[2]`` int32/int64 tensor for the stateless random start; the
            attack is a deterministic function of it (within one execution
            mode: under ``jit_compile`` XLA draws different numbers).
        gradient_at: ``"start"`` or ``"clean"`` (see above).

    Returns:
        float32 adversarial images, same shape as ``images``, gradient-free.

    Reference:
        https://arxiv.org/abs/2001.03994, https://arxiv.org/abs/2011.09820
    """
    _check_budget("eps", eps)
    _check_budget("step_size", step_size)
    if gradient_at not in GRADIENT_AT:
        raise ValueError(
            f"Expected `gradient_at` in {list(GRADIENT_AT)}. "
            f"Received: gradient_at={gradient_at!r}")
    images = tf.cast(images, tf.float32)
    eps = tf.cast(eps, tf.float32)
    step_size = tf.cast(step_size, tf.float32)
    delta = _start(images, eps, random_start, seed)
    at = images + delta if gradient_at == "start" else images
    grad = _loss_gradient(model_fn, at, labels)
    delta = _project(images, delta + step_size * tf.sign(grad), eps)
    return tf.stop_gradient(images + delta)


def pgd(model_fn, images, labels, *, eps, step_size, steps, random_start=True,
        seed):
    """Projected gradient descent (PGD-k), L-inf, pixels in [0, 1].

    ``steps`` signed-gradient steps of ``step_size`` from a (random) start,
    each followed by projection to the eps-ball around ``x`` and to [0, 1].
    The steps run in a `tf.while_loop`, so the graph holds one copy of the
    model whatever ``steps`` is. Gradient-free output, as for `fgsm`.

    Args:
        model_fn: maps float32 images in [0, 1] to logits.
        images: ``[N, H, W, C]`` clean images in [0, 1].
        labels: ``[N]`` integer labels.
        eps: L-inf radius, pixel units; a float or float32 scalar tensor.
        step_size: step per iteration, pixel units.
        steps: number of iterations, a Python int >= 1.
        random_start: start at a uniformly random point of the ball.
        seed: ``[2]`` int32/int64 tensor for the stateless random start.

    Returns:
        float32 adversarial images, gradient-free.

    Reference:
        Madry et al. https://arxiv.org/abs/1706.06083
    """
    _check_budget("eps", eps)
    _check_budget("step_size", step_size)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
            or steps < 1:
        raise ValueError(
            f"Expected `steps` to be an integer >= 1. Received: steps={steps!r}")
    images = tf.cast(images, tf.float32)
    eps = tf.cast(eps, tf.float32)
    step_size = tf.cast(step_size, tf.float32)

    def body(i, delta):
        grad = _loss_gradient(model_fn, images + delta, labels)
        return i + 1, _project(images, delta + step_size * tf.sign(grad), eps)

    delta = _start(images, eps, random_start, seed)
    _, delta = tf.while_loop(
        lambda i, _: i < steps, body, (tf.constant(0), delta),
        maximum_iterations=steps)
    return tf.stop_gradient(images + delta)


def attack(model_fn, images, labels, attack_cfg, seed):
    """Runs the attack an `config_lib.attack_config` describes.

    Args:
        model_fn: maps float32 images in [0, 1] to logits.
        images: ``[N, H, W, C]`` clean images in [0, 1].
        labels: ``[N]`` integer labels.
        attack_cfg: has ``name`` (``fgsm`` | ``pgd``), ``eps`` and
            ``step_size`` in 1/255 units (``step_size`` 0 means
            ``1.25 * eps`` for FGSM, ``eps / 4`` for PGD), ``steps`` (PGD),
            ``random_start`` and, optionally, ``gradient_at`` (FGSM only,
            see `fgsm`; default ``"start"``).
        seed: ``[2]`` integer tensor for the random start.

    Returns:
        float32 adversarial images, gradient-free.

    Example:

    >>> cfg = config_lib.attack_config(name="pgd", eps=8.0, steps=7)
    >>> x_adv = attack(lambda x: model(x, training=False), x, y, cfg,
    ...                tf.constant([0, step]))
    """
    name = attack_cfg.name
    if name not in ATTACKS:
        raise ValueError(
            f"Expected an attack name in {list(ATTACKS)}. "
            f"Received: attack.name={name!r}")
    eps = float(attack_cfg.eps) / 255.0
    step_size = float(attack_cfg.step_size) / 255.0
    gradient_at = attack_cfg.get("gradient_at", "start")
    if name == "fgsm":
        step_size = step_size or 1.25 * eps
        return fgsm(model_fn, images, labels, eps=eps, step_size=step_size,
                    random_start=bool(attack_cfg.random_start), seed=seed,
                    gradient_at=gradient_at)
    if gradient_at != "start":
        raise ValueError(
            "Expected attack.gradient_at='start' for PGD (each of its steps "
            "takes the gradient at its current iterate). "
            f"Received: gradient_at={gradient_at!r}")
    step_size = step_size or eps / 4.0
    return pgd(model_fn, images, labels, eps=eps, step_size=step_size,
               steps=int(attack_cfg.steps),
               random_start=bool(attack_cfg.random_start), seed=seed)
