"""Clean and adversarial accuracy of a trained network (``e2rnas evaluate``).

The attacks are cleverhans 4's TensorFlow 2 implementations, all L-inf in
pixel space [0, 1] with the true labels: FGSM (``fast_gradient_method``),
PGD (``projected_gradient_descent``, random start and restarts), BIM
(``basic_iterative_method``, PGD from the clean image) and MIM
(``momentum_iterative_method``). Budgets are given in 1/255 units, as in the
paper's tables, and converted here.

The model is attacked as it is deployed: ``model(x, training=False)`` (batch
norm moving statistics, no drop-path), in float32 whatever precision it was
trained in, so attack gradients are not rounded to 8 mantissa bits.

Each report carries sanity checks next to the numbers (Carlini et al.,
https://arxiv.org/abs/1902.06705): FGSM at eps 0 must reproduce the clean
accuracy exactly, and for every eps ``PGD <= FGSM <= clean``; a violation is
flagged as possible gradient masking, never corrected.

Reference:
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
    Goodfellow, Shlens, Szegedy. Explaining and Harnessing Adversarial
    Examples. https://arxiv.org/abs/1412.6572
    Madry et al. Towards Deep Learning Models Resistant to Adversarial
    Attacks. https://arxiv.org/abs/1706.06083
    Kurakin, Goodfellow, Bengio. Adversarial examples in the physical world.
    https://arxiv.org/abs/1607.02533
    Dong et al. Boosting Adversarial Attacks with Momentum.
    https://arxiv.org/abs/1710.06081
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from e2rnas_tf import data as data_lib
from e2rnas_tf import runtime
from e2rnas_tf.runs import checkpoints as ckpt_lib
from e2rnas_tf.runs import files
from e2rnas_tf.runs import progress as progress_lib
from e2rnas_tf.runs import workdir as workdir_lib
from e2rnas_tf.space import costs

__all__ = ["ATTACKS", "EvaluationError", "check_output", "cleverhans_attack",
           "evaluate", "evaluate_model", "float32_model", "format_table",
           "main", "sanity_checks"]

ATTACKS = ("fgsm", "pgd", "bim", "mim")
ITERATIVE = ("pgd", "bim", "mim")
_TITLES = {"fgsm": "FGSM", "pgd": "PGD", "bim": "BIM", "mim": "MIM"}
_MASKING = "possible gradient masking"


class EvaluationError(ValueError):
    """A bad evaluation setting or checkpoint; the message is one line."""


# ---------------------------------------------------------------------------
# Attacks.


def default_step_size(name, eps, step_size=0.0):
    """The per-iteration step of an attack, in the units of ``eps``.

    FGSM takes one step of exactly ``eps``; the iterative attacks take
    ``step_size``, or ``eps / 4`` when it is 0 (with 10 steps an iterate
    can travel 2.5 eps, the usual margin for PGD).

    Args:
        name: one of `ATTACKS`.
        eps: L-inf radius.
        step_size: requested step; 0 means the default.

    Returns:
        A float.
    """
    if name == "fgsm":
        return float(eps)
    return float(step_size) if step_size else float(eps) / 4.0


def cleverhans_attack(model_fn, images, labels, *, name, eps, step_size=0.0,
                      steps=10, random_start=False, decay_factor=1.0):
    """Adversarial images from one cleverhans 4 L-inf attack.

    Untargeted, with the true ``labels`` (not the model's predictions, which
    would let an already wrong prediction steer the attack), clipped to
    [0, 1].

    Runs eagerly or traced. Inside a `tf.function` keep autograph on:
    cleverhans' loops are Python ``while`` loops, which autograph turns into
    one `tf.while_loop` when ``steps`` is a tensor (one copy of the model in
    the graph) and unrolls when it is an int. ``eps`` and ``step_size`` of
    ``pgd``/``bim`` must be Python floats (cleverhans asserts
    ``step_size <= eps`` in Python); ``fgsm``/``mim`` also take tensors.

    Args:
        model_fn: maps float32 images ``[N, H, W, C]`` in [0, 1] to float32
            logits; run it in inference mode.
        images: ``[N, H, W, C]`` clean images in [0, 1].
        labels: ``[N]`` integer labels.
        name: ``fgsm`` | ``pgd`` | ``bim`` | ``mim``.
        eps: L-inf radius in pixel units ([0, 1] scale, e.g. ``8 / 255``).
        step_size: step of the iterative attacks, pixel units; 0 means
            ``eps / 4``. Ignored by FGSM, whose step is ``eps``.
        steps: iterations of the iterative attacks (int or int32 tensor).
        random_start: PGD only: start uniformly in the eps-ball (Madry et
            al.); BIM is PGD without it.
        decay_factor: MIM's momentum decay.

    Returns:
        float32 adversarial images, same shape as ``images``.

    Example:

    >>> model_fn = lambda x: model(x, training=False)
    >>> x_adv = cleverhans_attack(model_fn, x, y, name="pgd", eps=8 / 255,
    ...                           steps=10, random_start=True)

    Reference:
        https://github.com/cleverhans-lab/cleverhans (cleverhans.tf2),
        https://arxiv.org/abs/1706.06083, https://arxiv.org/abs/1710.06081
    """
    # Deferred so that importing this module (e.g. for `e2rnas --help`)
    # does not pull in cleverhans.
    from cleverhans.tf2.attacks import basic_iterative_method as bim_lib
    from cleverhans.tf2.attacks import fast_gradient_method as fgm_lib
    from cleverhans.tf2.attacks import momentum_iterative_method as mim_lib
    from cleverhans.tf2.attacks import projected_gradient_descent as pgd_lib

    if name not in ATTACKS:
        raise EvaluationError(
            f"Expected an attack in {list(ATTACKS)}. Received: name={name!r}")
    images = tf.cast(images, tf.float32)
    # sanity_checks=False everywhere: cleverhans' checks call np.all on
    # tensors, which cannot run in a graph; we validate budgets ourselves.
    common = dict(norm=np.inf, clip_min=0.0, clip_max=1.0, y=labels,
                  targeted=False, sanity_checks=False)
    if name == "fgsm":
        return fgm_lib.fast_gradient_method(model_fn, images, eps, **common)
    step_size = step_size if _is_tensor(step_size) else \
        default_step_size(name, eps, step_size)
    if name == "pgd":
        return pgd_lib.projected_gradient_descent(
            model_fn, images, eps, step_size, steps,
            rand_init=bool(random_start), **common)
    if name == "bim":
        return bim_lib.basic_iterative_method(
            model_fn, images, eps, step_size, steps, **common)
    return mim_lib.momentum_iterative_method(
        model_fn, images, eps, step_size, steps,
        decay_factor=decay_factor, **common)


def _is_tensor(value):
    return isinstance(value, (tf.Tensor, tf.Variable))


# ---------------------------------------------------------------------------
# Precision.


def _float32_policies(obj):
    """A copy of a serialised config with every mixed dtype policy float32.

    Only dtype policies change: a layer may well be named ``mixed_5b``.
    """
    if isinstance(obj, dict):
        if obj.get("class_name") == "DTypePolicy" and isinstance(
                obj.get("config"), dict):
            name = str(obj["config"].get("name", ""))
            if name.startswith("mixed_"):
                return dict(obj, config=dict(obj["config"], name="float32"))
        return {k: "float32" if k == "dtype" and isinstance(v, str)
                and v.startswith("mixed_") else _float32_policies(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float32_policies(v) for v in obj]
    return obj


def _compute_dtypes(model):
    dtypes = {model.compute_dtype}
    dtypes.update(layer.compute_dtype for layer in model._flatten_layers())
    return sorted(str(d) for d in dtypes)


def float32_model(model, input_shape):
    """The model with float32 computation, sharing nothing with ``model``.

    A network trained under a ``mixed_*`` policy computes in bfloat16 or
    float16; an attack through it would follow rounded gradients and could
    underestimate robustness. A float32 model is rebuilt from the model's
    config (every mixed dtype policy replaced by ``float32``, under a
    float32 global policy for layers that a parent creates without an
    explicit dtype) and given the same weights (mixed-precision variables
    are float32 already, so nothing is lost). A model that already computes
    in float32 is returned as is.

    Args:
        model: a built Keras model.
        input_shape: shape of one batch, e.g. ``(None, 32, 32, 3)``, to
            build the copy.

    Returns:
        ``(model, note)``: the float32 model and a one-line description of
        what was done (for the report).

    Raises:
        EvaluationError: if a mixed-precision model cannot be rebuilt from
            its config.
    """
    dtypes = _compute_dtypes(model)
    if dtypes == ["float32"]:
        return model, "model computes in float32"
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        config = _float32_policies(keras.saving.serialize_keras_object(model))
        clone = keras.saving.deserialize_keras_object(config)
        if not clone.built:
            clone(tf.zeros((1,) + tuple(input_shape[1:]), tf.float32),
                  training=False)
    except (TypeError, ValueError, KeyError, NotImplementedError) as e:
        raise EvaluationError(
            f"Cannot rebuild the {dtypes} model in float32 for the attacks: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
        ) from None
    finally:
        keras.mixed_precision.set_global_policy(previous)
    weights = model.get_weights()
    if len(clone.weights) != len(weights):
        raise EvaluationError(
            f"Expected the float32 copy to have {len(weights)} weights like "
            f"the model. Received: {len(clone.weights)}")
    clone.set_weights(weights)
    if _compute_dtypes(clone) != ["float32"]:
        raise EvaluationError(
            "Expected the rebuilt model to compute in float32. Received: "
            f"{_compute_dtypes(clone)}")
    return clone, f"rebuilt in float32 from a {'/'.join(dtypes)} model"


# ---------------------------------------------------------------------------
# Evaluation.


def _eps_key(eps):
    return f"{float(eps):g}"


def _check_settings(attacks, epsilons, pgd_steps, step_size, restarts,
                    num_examples, batch_size):
    attacks = tuple(attacks)
    for name in attacks:
        if name not in ATTACKS:
            raise EvaluationError(
                f"Expected attacks from {list(ATTACKS)}. "
                f"Received: attacks={list(attacks)}")
    if len(set(attacks)) != len(attacks):
        raise EvaluationError(
            f"Expected distinct attacks. Received: attacks={list(attacks)}")
    epsilons = tuple(float(e) for e in epsilons)
    if any(not np.isfinite(e) or e < 0 for e in epsilons) or \
            len(set(epsilons)) != len(epsilons):
        raise EvaluationError(
            "Expected distinct finite epsilons >= 0 (in 1/255). "
            f"Received: epsilons={list(epsilons)}")
    for name, value, minimum in (("pgd_steps", pgd_steps, 1),
                                 ("restarts", restarts, 1),
                                 ("num_examples", num_examples, 0),
                                 ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or int(value) != value or value < minimum:
            raise EvaluationError(
                f"Expected {name} to be an integer >= {minimum}. "
                f"Received: {name}={value!r}")
    if not np.isfinite(step_size) or step_size < 0:
        raise EvaluationError(
            f"Expected step_size >= 0 (1/255; 0 = eps/4). "
            f"Received: step_size={step_size!r}")
    if any(n in ITERATIVE for n in attacks):
        for eps in epsilons:
            if step_size > eps:
                # cleverhans' PGD asserts it; a step larger than the ball
                # would just bounce between its faces.
                raise EvaluationError(
                    f"Expected step_size <= every eps. Received: "
                    f"step_size={step_size:g}/255 > eps={eps:g}/255")
    return attacks, sorted(epsilons)


def _batches_of(dataset, batch_size):
    """Yields ``(images, labels)`` numpy batches from either input form."""
    if isinstance(dataset, tf.data.Dataset):
        for images, labels in dataset.as_numpy_iterator():
            yield images, labels
        return
    if not (isinstance(dataset, (tuple, list)) and len(dataset) == 2):
        raise EvaluationError(
            "Expected a tf.data.Dataset of (images, labels) batches or an "
            f"(images, labels) pair of arrays. Received: {type(dataset)}")
    images, labels = (np.asarray(a) for a in dataset)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise EvaluationError(
            "Expected images [N, H, W, C] and labels [N]. Received: "
            f"images {images.shape}, labels {labels.shape}")
    for start in range(0, len(labels), batch_size):
        yield (images[start:start + batch_size],
               labels[start:start + batch_size])


def _check_batch(images, labels):
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise EvaluationError(
            "Expected batches of images [B, H, W, C] and labels [B]. "
            f"Received: images {images.shape}, labels {labels.shape}")
    if not np.issubdtype(images.dtype, np.floating) or images.size and (
            images.min() < 0.0 or images.max() > 1.0):
        raise EvaluationError(
            "Expected float images in [0, 1]. Received: "
            f"dtype={images.dtype}, range=[{images.min()}, {images.max()}]")


def evaluate_model(model, dataset, *, attacks=("fgsm", "pgd", "mim"),
                   epsilons=(1.0, 2.0, 8.0), pgd_steps=10, step_size=0.0,
                   restarts=1, num_examples=0, seed=0, random_start=True,
                   batch_size=256, jit_compile=False, on_batch=None):
    """Clean and adversarial accuracy of ``model`` on ``dataset``.

    Every example is attacked with every attack at every eps (cleverhans,
    L-inf, true labels, pixels clipped to [0, 1]); robust accuracy is the
    share of adversarial images still classified correctly. PGD with a
    random start runs ``restarts`` times and an example counts as robust
    only if it survives every start. FGSM at eps 0 is run as a check of the
    pipeline, and the sanity checks of `sanity_checks` are attached.

    Where it runs: eagerly over the batches; each attack is a `tf.function`
    (autograph on, for cleverhans' loops) traced once per attack (and per
    eps for PGD/BIM, whose budgets cleverhans needs as Python floats).
    The random starts come from unseeded cleverhans ops, so they are made
    reproducible by setting TensorFlow's global seed to ``seed`` here.

    Args:
        model: any Keras model mapping float32 images in [0, 1] to logits
            (``call(x, training=False)``); computed in float32 (see
            `float32_model`).
        dataset: a `tf.data.Dataset` of ``(images, labels)`` batches, or an
            ``(images, labels)`` pair of arrays, images float in [0, 1].
        attacks: names from `ATTACKS`.
        epsilons: L-inf budgets in 1/255 units.
        pgd_steps: iterations of PGD, BIM and MIM.
        step_size: their step in 1/255 units; 0 means ``eps / 4``.
        restarts: random restarts of PGD (needs ``random_start``); the
            deterministic attacks run once.
        num_examples: evaluate only the first ``num_examples`` examples of
            ``dataset``; 0 means all.
        seed: seeds the PGD random starts.
        random_start: PGD starts uniformly in the eps-ball.
        batch_size: batch size when ``dataset`` is a pair of arrays.
        jit_compile: compile the attacks with XLA.
        on_batch: called after each batch with the number of examples
            evaluated so far (progress).

    Returns:
        A JSON-ready dict: ``num_examples``, ``clean_accuracy``,
        ``robust_accuracy`` (``{attack: {eps: accuracy}}``), ``attacks``
        (settings and counts per attack and eps), ``sanity`` (checks and
        ``flags``), ``precision``, ``seconds``.

    Example:

    >>> report = evaluate_model(model, (x_test, y_test), epsilons=[2, 8])
    >>> report["robust_accuracy"]["pgd"]["8"]  # share of x_test, e.g.
    0.47

    Reference:
        https://arxiv.org/abs/2011.09820 (E2RNAS, Table 2 protocol)
    """
    attacks, epsilons = _check_settings(
        attacks, epsilons, pgd_steps, step_size, restarts, num_examples,
        batch_size)
    start_time = time.perf_counter()
    tf.random.set_seed(int(seed))
    steps = tf.constant(int(pgd_steps), tf.int32)
    pgd_restarts = int(restarts) if random_start else 1
    runs = {name: (pgd_restarts if name == "pgd" else 1) for name in attacks}

    state = {}  # float32 model and compiled functions, built on first batch

    def setup(input_shape):
        model32, note = float32_model(model, input_shape)

        def model_fn(x):
            return tf.cast(model32(tf.cast(x, tf.float32), training=False),
                           tf.float32)

        images = tf.TensorSpec((None,) + tuple(input_shape[1:]), tf.float32)
        labels = tf.TensorSpec((None,), tf.int32)
        scalar = tf.TensorSpec((), tf.float32)

        def compile_fn(fn, signature=(images, labels, scalar, scalar),
                       autograph=True):
            # A batch axis of None: the last, partial batch reuses the trace.
            # Autograph turns cleverhans' Python while loops into one
            # tf.while_loop (steps is a tensor), keeping the graph small.
            return tf.function(fn, input_signature=signature,
                               autograph=autograph,
                               jit_compile=bool(jit_compile))

        def predict(x):
            return tf.argmax(model_fn(x), axis=-1, output_type=tf.int32)

        state.update(note=note, model_fn=model_fn, functions={},
                     predict=compile_fn(predict, (images,), False),
                     compile_fn=compile_fn)

    def attack_fn(name, eps):
        # FGSM and MIM take the budget as a tensor (one trace); cleverhans'
        # PGD asserts step <= eps in Python, so PGD/BIM are traced per eps.
        key = (name,) if name in ("fgsm", "mim") else (name, eps)
        if key not in state["functions"]:
            model_fn = state["model_fn"]
            if len(key) == 1:
                def fn(x, y, eps_t, step_t):
                    return cleverhans_attack(
                        model_fn, x, y, name=name, eps=eps_t,
                        step_size=step_t, steps=steps)
            else:
                eps_px = eps / 255.0
                step_px = default_step_size(name, eps, step_size) / 255.0

                def fn(x, y, eps_t, step_t):
                    del eps_t, step_t  # baked in, see above
                    return cleverhans_attack(
                        model_fn, x, y, name=name, eps=eps_px,
                        step_size=step_px, steps=steps,
                        random_start=random_start)
            state["functions"][key] = state["compile_fn"](fn)
        return state["functions"][key]

    def run_attack(name, eps, x, y):
        eps_t = tf.constant(eps / 255.0, tf.float32)
        step_t = tf.constant(
            default_step_size(name, eps, step_size) / 255.0, tf.float32)
        return attack_fn(name, eps)(x, y, eps_t, step_t)

    counts = {name: {e: {"correct": 0, "runs": [0] * runs[name]}
                     for e in epsilons} for name in attacks}
    seconds = {name: 0.0 for name in attacks}
    clean_correct = eps0_correct = total = 0
    for images, labels in _batches_of(dataset, int(batch_size)):
        if num_examples and total >= num_examples:
            break
        if num_examples:
            images = images[:num_examples - total]
            labels = labels[:num_examples - total]
        _check_batch(images, labels)
        if not state:
            setup(images.shape)
        x = tf.constant(images, tf.float32)
        y = tf.constant(labels, tf.int32)
        predict = state["predict"]
        clean = predict(x).numpy() == labels
        clean_correct += int(clean.sum())
        eps0 = predict(run_attack("fgsm", 0.0, x, y)).numpy() == labels
        eps0_correct += int(eps0.sum())
        for name in attacks:
            tick = time.perf_counter()
            for eps in epsilons:
                robust = np.ones_like(clean)
                for r in range(runs[name]):
                    adv = run_attack(name, eps, x, y)
                    hit = predict(adv).numpy() == labels
                    counts[name][eps]["runs"][r] += int(hit.sum())
                    robust &= hit
                counts[name][eps]["correct"] += int(robust.sum())
            seconds[name] += time.perf_counter() - tick
        total += len(labels)
        if on_batch is not None:
            on_batch(total)
    if total == 0:
        raise EvaluationError("Expected at least one example to evaluate. "
                              "Received: an empty dataset")

    report = {
        "num_examples": total,
        "clean_correct": clean_correct,
        "clean_accuracy": clean_correct / total,
        "robust_accuracy": {},
        "attacks": {},
        "eps_units": "1/255",
        "library": _cleverhans_version(),
        "precision": state["note"],
        "seed": int(seed),
        "jit_compile": bool(jit_compile),
    }
    for name in attacks:
        report["robust_accuracy"][name] = {}
        per_eps = {}
        for eps in epsilons:
            c = counts[name][eps]
            key = _eps_key(eps)
            report["robust_accuracy"][name][key] = c["correct"] / total
            entry = {"eps": eps, "correct": c["correct"],
                     "accuracy": c["correct"] / total,
                     "step_size": default_step_size(name, eps, step_size)}
            if name in ITERATIVE:
                entry["steps"] = int(pgd_steps)
            if name == "pgd":
                entry.update(random_start=bool(random_start),
                             restarts=runs[name],
                             restart_accuracies=[n / total for n in c["runs"]])
            per_eps[key] = entry
        report["attacks"][name] = {"epsilons": per_eps,
                                   "seconds": round(seconds[name], 3)}
    report["sanity"] = sanity_checks(
        clean_correct, eps0_correct,
        {n: {e: counts[n][e]["correct"] for e in epsilons} for n in attacks})
    report["sanity"]["eps0_fgsm_accuracy"] = eps0_correct / total
    report["seconds"] = round(time.perf_counter() - start_time, 3)
    return report


def _cleverhans_version():
    try:
        from importlib import metadata
        return f"cleverhans {metadata.version('cleverhans')}"
    except Exception:  # noqa: BLE001 - version is informative only
        return "cleverhans"


def sanity_checks(clean_correct, eps0_correct, correct):
    """Checks a valid attack evaluation must pass, from correct counts.

    - FGSM at eps 0 leaves the images unchanged, so its count must equal
      the clean count exactly (else the pipeline or the model is not
      deterministic, e.g. run in training mode).
    - No attack may be more accurate than the clean model, and for every
      eps, PGD, BIM and MIM (iterative, starting with FGSM's step or
      stronger) must not be more accurate than FGSM.
    - For each attack, accuracy must not rise with eps.

    Violations of the last two are the symptoms of gradient masking listed
    by Carlini et al.; they are flagged, not corrected.

    Args:
        clean_correct: correctly classified clean examples.
        eps0_correct: correctly classified examples after FGSM at eps 0.
        correct: ``{attack: {eps: correct count}}``.

    Returns:
        ``{"checks": [{"name", "passed", "detail"}], "flags": [str],
        "passed": bool}``; ``flags`` holds the detail of every failed check.

    Reference:
        Carlini et al. On Evaluating Adversarial Robustness.
        https://arxiv.org/abs/1902.06705
    """
    checks = []

    def check(name, passed, detail):
        checks.append({"name": name, "passed": bool(passed),
                       "detail": detail})

    check("eps0_equals_clean", eps0_correct == clean_correct,
          f"FGSM at eps 0: {eps0_correct} correct, clean: {clean_correct}"
          + ("" if eps0_correct == clean_correct else
             " (attack pipeline or model not deterministic)"))
    for name, per_eps in correct.items():
        for eps, n in sorted(per_eps.items()):
            check(f"{name}@{_eps_key(eps)}<=clean", n <= clean_correct,
                  f"{name} at eps {_eps_key(eps)}/255: {n} correct, clean: "
                  f"{clean_correct}"
                  + ("" if n <= clean_correct else f" ({_MASKING})"))
            if name != "fgsm" and "fgsm" in correct and \
                    eps in correct["fgsm"]:
                m = correct["fgsm"][eps]
                check(f"{name}@{_eps_key(eps)}<=fgsm", n <= m,
                      f"{name} at eps {_eps_key(eps)}/255: {n} correct, "
                      f"fgsm: {m}" + ("" if n <= m else f" ({_MASKING})"))
        ordered = sorted(per_eps.items())
        for (e0, n0), (e1, n1) in zip(ordered, ordered[1:]):
            check(f"{name}@{_eps_key(e1)}<={name}@{_eps_key(e0)}", n1 <= n0,
                  f"{name}: {n1} correct at eps {_eps_key(e1)}/255, {n0} at "
                  f"{_eps_key(e0)}/255" + ("" if n1 <= n0 else
                                          f" ({_MASKING})"))
    flags = [c["detail"] for c in checks if not c["passed"]]
    return {"checks": checks, "flags": flags, "passed": not flags}


# ---------------------------------------------------------------------------
# Reporting.


def _attack_title(name, report):
    entry = next(iter(report["attacks"][name]["epsilons"].values()))
    title = _TITLES[name]
    if name in ITERATIVE:
        title += f"-{entry['steps']}"
    if name == "pgd" and entry.get("restarts", 1) > 1:
        title += f" x{entry['restarts']} restarts"
    return title


def format_table(report):
    """The markdown table of a report: attacks by eps, accuracy in %.

    Args:
        report: a dict from `evaluate_model` (optionally with the extra
            fields `main` adds: checkpoint, dataset, params, flops).

    Returns:
        A markdown string (title, summary lines, table, sanity lines).
    """
    epsilons = sorted({float(k) for per in report["robust_accuracy"].values()
                       for k in per})
    title = "# Evaluation"
    if "checkpoint" in report:
        title += f" of {report['checkpoint']}"
    lines = [title, ""]
    summary = [f"{report['num_examples']} test images"]
    if "dataset" in report:
        summary[0] += f" of {report['dataset']}"
    if "params" in report:
        summary.append(f"{report['params'] / 1e6:.3f} M parameters")
    if "flops" in report:
        summary.append(f"{report['flops'] / 1e6:.1f} M multiply-adds")
    summary.append(f"{report['library']}, L-inf, eps in /255")
    lines += ["; ".join(summary) + ".", ""]
    lines.append(f"Clean accuracy: {100 * report['clean_accuracy']:.2f} %.")
    lines.append("")
    header = ["attack"] + [f"eps={_eps_key(e)}/255" for e in epsilons]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(epsilons)) + "|")
    for name, per in report["robust_accuracy"].items():
        cells = [f"{100 * per[_eps_key(e)]:.2f}" if _eps_key(e) in per else ""
                 for e in epsilons]
        lines.append("| " + " | ".join([_attack_title(name, report)] + cells)
                     + " |")
    lines.append("")
    sanity = report["sanity"]
    lines.append(
        f"Sanity: FGSM at eps 0 gives {100 * sanity['eps0_fgsm_accuracy']:.2f}"
        f" % (clean {100 * report['clean_accuracy']:.2f} %); "
        f"{sum(c['passed'] for c in sanity['checks'])}/"
        f"{len(sanity['checks'])} checks passed.")
    for flag in sanity["flags"]:
        lines.append(f"- FLAG: {flag}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Command line.


def _subset(data, count, seed):
    """A seeded random subset of ``count`` examples, in data order."""
    from e2rnas_tf import data as data_lib

    if not count or count >= len(data):
        return data
    index = np.sort(np.random.default_rng([int(seed), count]).permutation(
        len(data))[:count])
    return data_lib.ArrayData(data.images[index], data.labels[index])


def _read_json(path):
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"{path} is not valid JSON: {e}") from None


def _count_flops(model, image_size):
    """Multiply-adds of one image, or ``(None, reason)``."""
    try:
        return costs.count_inference_macs(model, image_size), None
    except ValueError as e:
        return None, f"FLOPs omitted: {str(e).splitlines()[0]}"


def write_summaries(logdir, report):
    """The report's accuracies as TensorBoard scalars.

    ``eval/clean_accuracy`` and ``eval/<attack>_accuracy`` with the
    epsilon (/255) as the step, so each attack is a curve of accuracy
    against budget in TensorBoard.

    The directory holds one evaluation, the report's: event files of an
    earlier evaluation there (the report it replaced) are removed once the
    new file is written, so TensorBoard never shows two curves at one step.

    Args:
        logdir: event file directory (a run's ``tb/evaluation``).
        report: an `evaluate_model` report.
    """
    import tensorflow as tf

    old = (glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
           if os.path.isdir(logdir) else [])
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        tf.summary.scalar("eval/clean_accuracy", report["clean_accuracy"],
                          step=0)
        for name, per_eps in report["robust_accuracy"].items():
            for eps, accuracy in per_eps.items():
                tf.summary.scalar(f"eval/{name}_accuracy", accuracy,
                                  step=int(round(float(eps))))
    writer.close()
    for path in old:
        os.remove(path)


# Fields of config.data that decide the test images an evaluation sees
# (the training-only fields, augmentation and num_train, do not).
_TEST_DATA_FIELDS = ("name", "root", "data_dir", "image_size", "num_test",
                     "seed")


def evaluation_seed(config):
    """The seed of the test subset and the PGD random starts:
    ``config.evaluate.seed``, or the run's ``config.seed`` if it is -1."""
    seed = config.evaluate.get("seed", -1)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < -1:
        raise EvaluationError(
            "Expected config.evaluate.seed to be an integer >= 0, or -1 for "
            f"the run's seed. Received: {seed!r}")
    return int(config.seed) if seed == -1 else seed


def _identity(config, checkpoint):
    """What decides an evaluation's numbers, as stored in its report."""
    data = {k: config.data.get(k) for k in _TEST_DATA_FIELDS}
    return {"checkpoint": os.path.abspath(checkpoint),
            "evaluate_config": config.evaluate.to_dict(), "data": data,
            "seed": evaluation_seed(config)}


def check_output(out_dir, identity, overwrite=False):
    """Refuses to replace another evaluation's ``evaluation.json``.

    The identity rule of every run (`runs.workdir.claim`): an
    ``evaluation.json`` in ``out_dir`` made from the same checkpoint (same
    absolute path), the same ``config.evaluate`` settings, the same test
    data (``config.data`` fields in `_TEST_DATA_FIELDS`) and the same seed
    is this very evaluation: it is re-run and replaced (idempotent). Any
    other one, or one that is not readable JSON, is kept unless
    ``overwrite``. Nothing is written here.

    Args:
        out_dir: the directory the report goes to.
        identity: `_identity` of the evaluation about to run.
        overwrite: replace whatever is there.

    Raises:
        runs.workdir.WorkdirError: naming the directory, the differences
            and ``--overwrite``.
    """
    def read(path):
        stored = files.read_json(path)
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
        return {k: stored.get(k) for k in identity}

    workdir_lib.claim(out_dir, identity, record="evaluation.json",
                      read=read, overwrite=overwrite, what="evaluation")


def evaluate(config, checkpoint, out_dir=None, *, overwrite=False,
             log=print):
    """Evaluates a trained model and writes ``evaluation.json``/``.md``.

    Args:
        config: a train config; ``config.data`` selects the test split and
            ``config.evaluate`` the attacks.
        checkpoint: a ``.keras`` file or a training workdir (see
            `export.resolve_checkpoint`).
        out_dir: where the report goes (default: the checkpoint's directory).
        overwrite: replace an ``evaluation.json`` there that another
            evaluation wrote. Without it such a file is refused (before the
            model and data are loaded, and left untouched); one written by
            this same evaluation (same checkpoint path, ``config.evaluate``,
            test data fields and seed, see `check_output`) is re-evaluated
            and replaced, so rerunning a command is idempotent.
        log: a print-like callable for the progress lines and the table.

    Returns:
        The report dict (as written to ``evaluation.json``): the fields of
        `evaluate_model` plus ``checkpoint``, ``dataset``, ``data`` (the
        test data fields of ``config.data``), ``num_classes``,
        ``class_names``, ``params``, ``flops`` (or ``flops_note``),
        ``genotype`` if known, ``warning`` if the run was trained on other
        data, ``evaluate_config`` and ``created``.

    Raises:
        EvaluationError: bad settings, or an ``evaluation.json`` of another
            evaluation in ``out_dir`` without ``overwrite``.

    Example:

    >>> report = evaluate(config, "runs/train")  # doctest: +SKIP
    >>> report["robust_accuracy"]["pgd"]["8"]  # doctest: +SKIP
    """
    ev = config.evaluate
    # Bad settings fail before the model and data are loaded.
    _check_settings(ev.attacks, ev.epsilons, ev.pgd_steps, ev.step_size,
                    ev.restarts, ev.num_examples, ev.batch_size)
    seed = evaluation_seed(config)
    path = ckpt_lib.resolve_model_file(checkpoint)
    run_dir = os.path.dirname(os.path.abspath(path))
    out_dir = os.path.abspath(out_dir) if out_dir else run_dir
    identity = _identity(config, path)
    # Before the slow part: another evaluation's report is never replaced
    # without --overwrite.
    check_output(out_dir, identity, overwrite)
    # Evaluation computes in float32 whatever the training precision was
    # (see float32_model); layers created during loading follow this.
    with runtime.configured(config), runtime.precision_policy("float32"):
        return _evaluate(config, path, run_dir, out_dir, identity, seed, log)


def _evaluate(config, path, run_dir, out_dir, identity, seed, log):
    ev = config.evaluate
    model = ckpt_lib.load_model_file(path)

    _, test, info = data_lib.load(config.data)
    test = _subset(test, int(ev.num_examples), seed)
    dataset = data_lib.batches(test, int(ev.batch_size), seed=seed,
                               epoch=0, training=False)
    image_shape = (info.image_size, info.image_size, 3)
    model(tf.zeros((1,) + image_shape), training=False)  # builds if needed

    log(f"evaluating {path} on {len(test)} {info.name} test images "
        f"(clean, {', '.join(ev.attacks)} at eps {list(ev.epsilons)}/255; "
        "the first batch includes compiling the attacks)")
    progress = progress_lib.Progress(len(test), log=log, every=1)
    progress.begin(len(test))
    report = evaluate_model(
        model, dataset, attacks=tuple(ev.attacks),
        epsilons=tuple(ev.epsilons), pgd_steps=int(ev.pgd_steps),
        step_size=float(ev.step_size), restarts=int(ev.restarts),
        num_examples=0, seed=seed,
        random_start=bool(ev.get("random_start", True)),
        jit_compile=bool(config.jit_compile),
        on_batch=lambda n: progress.update(
            n, line=lambda: f"evaluated {n}/{len(test)} images"))

    header = {"checkpoint": identity["checkpoint"], "dataset": info.name,
              "data": identity["data"],
              "num_classes": info.num_classes,
              "class_names": list(info.class_names),
              "params": costs.count_params(model)}
    flops, note = _count_flops(model, info.image_size)
    if flops is None:
        header["flops_note"] = note
    else:
        header["flops"] = flops
    genotype = getattr(model, "genotype", None)
    if genotype is not None and hasattr(genotype, "to_dict"):
        header["genotype"] = genotype.to_dict()
    elif _read_json(os.path.join(run_dir, "genotype.json")) is not None:
        header["genotype"] = _read_json(os.path.join(run_dir, "genotype.json"))
    # The data come from --config; a mismatch with the run's own data
    # (another data set or resolution) would silently give wrong numbers.
    train_data = (_read_json(os.path.join(run_dir, "config.json")) or {}
                  ).get("data", {})
    mismatch = [f"{k}={train_data[k]!r} (here {config.data[k]!r})"
                for k in ("name", "image_size")
                if k in train_data and train_data[k] != config.data[k]]
    if mismatch:
        header["warning"] = ("the model was trained with data "
                             + ", ".join(mismatch))
        log(f"WARNING: {header['warning']}")
    header["evaluate_config"] = ev.to_dict()
    header["created"] = datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds")
    report = {**header, **report}

    os.makedirs(out_dir, exist_ok=True)
    table = format_table(report)
    files.write_json(os.path.join(out_dir, "evaluation.json"), report,
                     sort_keys=False)
    files.write_text(os.path.join(out_dir, "evaluation.md"), table)
    write_summaries(os.path.join(out_dir, "tb", "evaluation"), report)
    log(table.rstrip("\n"))
    log(f"wrote {os.path.join(out_dir, 'evaluation.json')} and "
        "evaluation.md")
    return report


def main(config, args):
    """``e2rnas evaluate --checkpoint=<train workdir or .keras> [--workdir]``.

    Loads the model, evaluates it on the test split of ``config.data`` with
    the settings of ``config.evaluate`` and writes ``evaluation.json`` and
    ``evaluation.md`` to ``--workdir`` (default: the checkpoint's
    directory), printing the table.

    Example:

        e2rnas evaluate --config=configs/train_cifar10.py \\
            --checkpoint=runs/train --config.evaluate.num_examples=1000
    """
    evaluate(config, args.checkpoint, args.workdir, overwrite=args.overwrite)
    return 0
