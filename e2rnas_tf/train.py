"""``e2rnas train``: retrain a genotype from scratch (DARTS protocol).

SGD with momentum 0.9, learning rate 0.025 annealed to 0 by a per-epoch
cosine, L2 weight decay 3e-4 added to the gradient (as PyTorch's SGD does),
gradient clipping at global norm 5, batch 96, cutout 16, drop-path rising
linearly from 0 to 0.2 over training and an auxiliary loss weighted 0.4.
Optionally adversarial training (``config.adv_train``): a share of every
batch is replaced by adversarial examples made against the current weights.

Differences from PyTorch DARTS, all small: Keras' SGD folds the learning
rate into the momentum buffer (``v = m v - lr g``) where PyTorch applies it
after (``w -= lr (m b + g)``), which differs only in the step after an lr
change, i.e. at epoch boundaries; weight decay, as there, covers every
trainable variable (batch-norm scales and biases included).

Work directory layout::

    config.json         resolved config (the run's identity)
    genotype.json       the genotype trained
    metrics.jsonl       one JSON line per epoch
    checkpoints/        tf.train checkpoints: model, optimizer, step, best
    tb/                 TensorBoard scalars
    model_last.keras    the model after the last epoch
    model_best.keras    the model with the best test accuracy so far
    summary.json        final figures (parameters, multiply-adds, accuracy,
                        class names: `e2rnas export` serves them)

Reference:
    Liu, Simonyan, Yang. DARTS. https://arxiv.org/abs/1806.09055
    Yue, Lin, Huang, Zhang. E2RNAS. https://arxiv.org/abs/2011.09820
    Wong, Rice, Kolter. Fast is better than free.
    https://arxiv.org/abs/2001.03994
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time

import keras
import tensorflow as tf

from e2rnas_tf import checkpointing
from e2rnas_tf import data as data_lib
from e2rnas_tf import genotypes as genotypes_lib
from e2rnas_tf import model as model_lib
from e2rnas_tf import objectives
from e2rnas_tf import runtime
from e2rnas_tf import tensorboard as tb_lib

__all__ = ["WorkdirError", "TrainingDiverged", "cosine_lr", "drop_path_at",
           "main", "train"]

# Written by `train`; a workdir holding any of them belongs to some run.
OUTPUTS = ("config.json", "genotype.json", "metrics.jsonl", "checkpoints",
           "tb", "model_last.keras", "model_best.keras", "summary.json")
# Fields that do not change what is trained, so a run may resume with them
# changed; everything else must match the workdir's config.json.
_NON_IDENTITY_FIELDS = ("log_every", "checkpoint_every", "profile_steps",
                        "evaluate")


class WorkdirError(ValueError):
    """The workdir holds a different run (and --overwrite was not given)."""


class TrainingDiverged(ValueError):
    """The training loss became NaN or Inf."""


def cosine_lr(epoch, epochs, lr, lr_min=0.0):
    """DARTS' per-epoch cosine annealing, ``lr`` at epoch 0.

    Args:
        epoch: 0-based epoch.
        epochs: total epochs.
        lr: initial learning rate.
        lr_min: value approached at the end.

    Returns:
        ``lr_min + (lr - lr_min) * (1 + cos(pi * epoch / epochs)) / 2``.

    Example:

    >>> cosine_lr(0, 10, 0.1), cosine_lr(5, 10, 0.1)
    (0.1, 0.05...)
    """
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * epoch
                                                         / epochs))


def drop_path_at(epoch, epochs, drop_path):
    """DARTS' linear drop-path schedule: ``drop_path * epoch / epochs``."""
    return drop_path * epoch / epochs


def _check_config(config):
    def positive(name, value):
        if int(value) != value or value < 1:
            raise ValueError(
                f"Expected config.{name} to be an integer >= 1. "
                f"Received: {name}={value!r}")
    positive("epochs", config.epochs)
    positive("batch_size", config.batch_size)
    positive("eval_batch_size", config.eval_batch_size)
    if int(config.steps_per_epoch) != config.steps_per_epoch \
            or config.steps_per_epoch < 0:
        raise ValueError(
            "Expected config.steps_per_epoch to be an integer >= 0. "
            f"Received: steps_per_epoch={config.steps_per_epoch!r}")
    if not 0.0 <= config.adv_train.ratio <= 1.0:
        raise ValueError(
            "Expected config.adv_train.ratio in [0, 1]. "
            f"Received: ratio={config.adv_train.ratio!r}")
    if config.model.auxiliary_weight < 0:
        raise ValueError(
            "Expected config.model.auxiliary_weight >= 0. Received: "
            f"auxiliary_weight={config.model.auxiliary_weight!r}")


# ---------------------------------------------------------------------------
# Work directory.


def _identity(config_dict):
    return {k: v for k, v in config_dict.items()
            if k not in _NON_IDENTITY_FIELDS}


def _check_workdir(workdir, config_dict, genotype, overwrite):
    """Decides what to do with ``workdir`` before anything is written.

    Returns:
        ``(resume, stale)``: whether it holds this very run (resume from
        its checkpoint), and the outputs of a different run to delete
        (only with ``overwrite``; otherwise that raises `WorkdirError`).
    """
    config_path = os.path.join(workdir, "config.json")
    genotype_path = os.path.join(workdir, "genotype.json")
    present = [name for name in OUTPUTS
               if os.path.exists(os.path.join(workdir, name))]
    same = False
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                old = json.load(f)
            old_genotype = genotypes_lib.Genotype.load(genotype_path)
            same = (_identity(old) == _identity(config_dict)
                    and old_genotype == genotype)
        except (OSError, ValueError):
            same = False
    if present and not same and not overwrite:
        raise WorkdirError(
            f"Workdir {workdir} holds a different run (its config.json "
            "or genotype differs, or is missing); choose another "
            "--workdir or pass --overwrite to replace it")
    return same, ([] if same else present)


def _init_workdir(workdir, config_dict, genotype, stale):
    for name in stale:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), config_dict)
    genotype.save(os.path.join(workdir, "genotype.json"))


def _write_json(path, value):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _save_model(model, path):
    # Keras insists on the .keras suffix, so the temporary file keeps it.
    tmp = os.path.join(os.path.dirname(path),
                       f".tmp-{os.getpid()}-{os.path.basename(path)}")
    model.save(tmp)
    os.replace(tmp, path)


def _rewrite_metrics(path, start_epoch):
    """Keeps the metric lines of epochs before ``start_epoch`` (resume)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f
                 if line.strip() and json.loads(line)["epoch"] < start_epoch]
    with open(path, "w") as f:
        f.writelines(lines)


# ---------------------------------------------------------------------------
# Steps.


def _loss_scale(optimizer):
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return tf.cast(optimizer.dynamic_scale, tf.float32)
    return tf.constant(1.0)


def _pad_batch(batch_size):
    """Pads an evaluation batch to ``batch_size`` and adds a validity mask,
    so that every eval step has one static shape (one trace) and every
    replica gets an equal share."""
    def pad(images, labels):
        n = tf.shape(labels)[0]
        images = tf.pad(images, [[0, batch_size - n], [0, 0], [0, 0], [0, 0]])
        labels = tf.pad(labels, [[0, batch_size - n]])
        valid = tf.sequence_mask(n, batch_size, tf.float32)
        images = tf.ensure_shape(images, [batch_size] + images.shape[1:])
        return images, tf.ensure_shape(labels, [batch_size]), valid
    return pad


def make_train_step(model, optimizer, strategy, config):
    """The compiled training step.

    Runs in the caller's (cross-replica) context; the returned function
    calls the per-replica step through ``strategy.run`` and reduces its
    scalars.

    Args:
        model: a built `DerivedNetwork` created in ``strategy.scope()``.
        optimizer: a Keras SGD, or a LossScaleOptimizer around one.
        strategy: the `tf.distribute.Strategy` the variables live in.
        config: the train config.

    Returns:
        ``step_fn(images, labels, step) -> dict`` of float32 scalars:
        ``loss`` (total), ``ce``, ``aux_ce``, ``accuracy`` (on the trained
        batch), ``grad_norm`` (before clipping), ``loss_scale`` and
        ``skipped`` (1 if the loss or gradient was NaN/Inf: then nothing,
        batch-norm statistics included, was changed).
    """
    variables = model.trainable_variables
    if not optimizer.built:
        # Slots (and the loss scale) must exist before tracing, in scope.
        with strategy.scope():
            optimizer.build(variables)
    aux_weight = float(config.model.auxiliary_weight)
    weight_decay = float(config.optim.weight_decay)
    clip = float(config.optim.grad_clip)
    adv = config.adv_train
    replicas = strategy.num_replicas_in_sync
    per_replica = config.batch_size // replicas
    num_adv = int(round(adv.ratio * per_replica)) if adv.enabled else 0
    seed = int(config.seed)

    scope = runtime.jit_scope(config.jit_compile, replicas)

    def replica_grads(images, labels, step, replica):
        # This replica's own computation: attack, forward and backward.
        if num_adv:
            attack_seed = tf.stack([tf.constant(seed, tf.int64),
                                    step * replicas + replica])
            # Training-mode forwards, as fast adversarial training does
            # in PyTorch (model.train()): batch statistics, drop-path on.
            adv_images = objectives.attack(
                lambda x: model(x, training=True), images[:num_adv],
                labels[:num_adv], adv.attack, attack_seed)
            images = tf.concat([adv_images, images[num_adv:]], axis=0)
        with tf.GradientTape() as tape:
            # Drop-path masks from (seed, step, replica): resumable.
            drop_seed = tf.stack([tf.constant(seed + 1, tf.int64),
                                  step * replicas + replica])
            logits, aux_logits = model.call_with_aux(
                images, training=True, drop_seed=drop_seed)
            ce = objectives.cross_entropy(logits, labels)
            aux_ce = (objectives.cross_entropy(aux_logits, labels)
                      if aux_logits is not None else tf.constant(0.0))
            loss = ce + aux_weight * aux_ce
            # `loss` is the mean over this replica's equal share of the
            # global batch; dividing by the number of replicas makes the
            # sum of the replicas' gradients the gradient of the mean over
            # the global batch, independent of the number of replicas.
            scaled = optimizer.scale_loss(loss / replicas)
        grads = tape.gradient(scaled, variables)
        return loss, ce, aux_ce, objectives.accuracy(logits, labels), grads

    if scope == "replica":
        # One XLA program per device; the all-reduce and the update stay
        # outside it (`runtime.jit_scope`).
        replica_grads = runtime.per_replica_xla(replica_grads)

    def replica_step(images, labels, step):
        # Runs once per replica, inside `strategy.run`.
        ctx = tf.distribute.get_replica_context()
        replica = tf.cast(ctx.replica_id_in_sync_group, tf.int64)
        loss, ce, aux_ce, accuracy, grads = replica_grads(
            images, labels, step, replica)
        # Clip the global gradient (the sum over replicas), not each
        # replica's share: all-reduce first.
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        scale = _loss_scale(optimizer)
        # With loss scaling the gradients are `scale` times too large; clip
        # and decay in that unit so the LossScaleOptimizer's unscaling (and
        # its skip on non-finite gradients) sees consistent values.
        grads, norm = tf.clip_by_global_norm(grads, clip * scale)
        # L2 on the gradient after clipping, as torch.optim.SGD applies
        # weight_decay (not decoupled decay).
        grads = [g + (weight_decay * scale) * tf.cast(v, g.dtype)
                 for g, v in zip(grads, variables)]
        # Keras optimizers sum gradients over replicas once more when
        # applied in a replica context; pre-divide so the sum is unchanged.
        if replicas > 1:
            grads = [g / replicas for g in grads]
        optimizer.apply(grads, variables)
        return {
            "loss": loss, "ce": ce, "aux_ce": aux_ce, "accuracy": accuracy,
            "grad_norm": norm / scale, "loss_scale": scale,
        }

    # Everything a step writes: weights, batch-norm statistics, optimizer
    # slots and counters (a loss-scale optimizer's scale included).
    state = list(model.weights) + list(optimizer.variables)
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def step_fn(images, labels, step):
        saved = [tf.identity(v.value) for v in state]
        out = strategy.run(replica_step, args=(images, labels, step))
        out = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
               for k, v in out.items()}
        # A non-finite loss or gradient skips the step: every variable gets
        # its value from before the step back. (A loss-scale optimizer
        # already skips overflowing gradients itself and must keep its
        # halved scale, so there only the loss decides.)
        ok = tf.math.is_finite(out["loss"])
        if not loss_scaled:
            ok = ok & tf.math.is_finite(out["grad_norm"])

        def undo():
            for v, s in zip(state, saved):
                v.assign(s)
            return tf.constant(1.0)

        out["skipped"] = tf.cond(ok, lambda: tf.constant(0.0), undo)
        return out

    return tf.function(step_fn, autograph=False,
                       jit_compile=scope == "step")


def make_eval_step(model, strategy, config):
    """The compiled evaluation step on padded batches.

    Returns:
        ``eval_fn(images, labels, valid) -> dict`` of global sums:
        ``loss_sum``, ``correct`` and ``count`` (float32).
    """
    def replica_eval(images, labels, valid):
        logits = model(images, training=False)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=logits)
        hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                labels), tf.float32)
        return {"loss_sum": tf.reduce_sum(ce * valid),
                "correct": tf.reduce_sum(hits * valid),
                "count": tf.reduce_sum(valid)}

    scope = runtime.jit_scope(config.jit_compile,
                              strategy.num_replicas_in_sync)
    if scope == "replica":
        replica_eval = runtime.per_replica_xla(replica_eval)

    def eval_fn(images, labels, valid):
        out = strategy.run(replica_eval, args=(images, labels, valid))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in out.items()}

    return tf.function(eval_fn, autograph=False,
                       jit_compile=scope == "step")


def evaluate_clean(eval_fn, strategy, test, batch_size):
    """Clean loss and accuracy over a whole split."""
    ds = data_lib.batches(test, batch_size, seed=0, epoch=0, training=False)
    ds = ds.map(_pad_batch(batch_size))
    ds = strategy.experimental_distribute_dataset(ds)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for images, labels, valid in ds:
        out = eval_fn(images, labels, valid)
        for k in totals:
            totals[k] += float(out[k])
    count = max(totals["count"], 1.0)
    return totals["loss_sum"] / count, totals["correct"] / count


# ---------------------------------------------------------------------------
# The loop.


def _fingerprint(config, genotype, info):
    """What decides the checkpointed variables (see `checkpointing`)."""
    return {"genotype": genotype.to_dict(), "dataset": info.name,
            "num_classes": info.num_classes, "image_size": info.image_size,
            "model": config.model.to_dict(),
            "mixed_precision": config.mixed_precision}


def train(config, workdir, *, overwrite=False):
    """Trains ``config.genotype`` from scratch and writes ``workdir``.

    Resumes from the latest checkpoint if ``workdir`` holds the same run
    (same config up to logging fields, same genotype); refuses a workdir
    holding a different run unless ``overwrite``, which deletes its
    training outputs first.

    Args:
        config: a train config (`config_lib.train_config`).
        workdir: output directory.
        overwrite: replace a different run's outputs in ``workdir``.

    Returns:
        A dict: ``params`` (without the auxiliary head), ``macs`` (one
        inference forward of one image at the data's size),
        ``best_accuracy``, ``last_accuracy`` (clean test accuracy),
        ``epochs``, ``steps``, ``image_size``, ``num_classes``, ``workdir``.

    Example:

    >>> config = config_lib.train_config()
    >>> config.data.image_size, config.epochs = 16, 1
    >>> train(config, "/tmp/run")["best_accuracy"]  # doctest: +SKIP
    """
    # The run holds its workdir's lock (checkpointing.WorkdirLock) from
    # its first write until it returns or raises.
    with contextlib.ExitStack() as stack:
        return _train(config, workdir, overwrite=overwrite, stack=stack)


def _train(config, workdir, *, overwrite=False, stack):
    _check_config(config)
    runtime.configure(config)
    # Before any TensorFlow op: MultiWorkerMirroredStrategy configures the
    # collective ops, which is possible only at program start.
    strategy = runtime.make_strategy(config)
    # Every worker of a multi-worker run decides from the chief's workdir;
    # only the chief writes there, the others into scratch directories.
    chief_dir = workdir
    workdir = runtime.output_dir(config, chief_dir)
    genotype = genotypes_lib.get(config.genotype)
    config_dict = config.to_dict()
    # Refuse a foreign workdir before the slow set-up, but write to it only
    # once the data loaded, so that a config the data rejects can be fixed
    # and rerun in the same workdir.
    resume, stale = _check_workdir(chief_dir, config_dict, genotype,
                                   overwrite)
    if workdir != chief_dir:
        stale = []
    train_data, test_data, info = data_lib.load(config.data)

    replicas = strategy.num_replicas_in_sync
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % replicas:
            raise ValueError(
                f"Expected config.{name} divisible by the {replicas} "
                f"replicas. Received: {name}={config[name]}")
    data_lib.check_batch_fits(config.batch_size, {"training": len(train_data)})
    available = data_lib.steps_per_epoch(len(train_data), config.batch_size,
                                         training=True)
    steps_per_epoch = int(config.steps_per_epoch) or available
    if steps_per_epoch > available or available == 0:
        raise ValueError(
            f"Expected config.steps_per_epoch <= {available} (batches of "
            f"{config.batch_size} in {len(train_data)} training images). "
            f"Received: steps_per_epoch={config.steps_per_epoch}")

    # From here on the run owns the workdir; no other process may write
    # it at the same time (the lock is taken before anything is deleted).
    stack.enter_context(checkpointing.WorkdirLock(workdir))
    _init_workdir(workdir, config_dict, genotype, stale)

    size = info.image_size
    with strategy.scope():
        # Every variable (model, optimizer, counters) is created in scope
        # so that it is mirrored across replicas.
        model = model_lib.DerivedNetwork(
            genotype, channels=config.model.channels,
            num_classes=info.num_classes, layers=config.model.layers,
            auxiliary=config.model.auxiliary, mean=info.mean, std=info.std,
            drop_path=0.0, name="derived_network")
        model.build((None, size, size, 3))
        sgd = keras.optimizers.SGD(learning_rate=config.optim.lr,
                                   momentum=config.optim.momentum)
        optimizer = sgd
        if config.mixed_precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(sgd)
        optimizer.build(model.trainable_variables)
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name="global_step")
        best = tf.Variable(-1.0, dtype=tf.float32, trainable=False,
                           name="best_accuracy")
    def run_checkpoint(directory):
        return checkpointing.RunCheckpoint(
            os.path.join(directory, "checkpoints"),
            {"model": checkpointing.variables_by_path(model),
             "optimizer": checkpointing.optimizer_variables(optimizer),
             "step": global_step, "best_accuracy": best},
            fingerprint=_fingerprint(config, genotype, info), max_to_keep=3)

    checkpoint = run_checkpoint(workdir)
    if resume:
        # A non-chief worker resumes from the chief's checkpoints.
        (checkpoint if workdir == chief_dir
         else run_checkpoint(chief_dir)).restore()
    start_step = int(global_step.numpy())
    start_epoch = start_step // steps_per_epoch
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    _rewrite_metrics(metrics_path, start_epoch)

    params = model_lib.count_params(model)
    macs = model_lib.count_flops(model, size)
    print(f"e2rnas train: {info.name} {info.num_train}/{info.num_test} "
          f"images {size}x{size}, {config.model.layers} cells C="
          f"{config.model.channels}, {params / 1e6:.3f}M params, "
          f"{macs / 1e6:.1f}M multiply-adds, {replicas} replica(s)"
          + (f", resuming at epoch {start_epoch + 1}"
             if start_step and start_epoch < config.epochs else "")
          + (", already complete" if start_epoch >= config.epochs else ""),
          flush=True)

    train_fn = make_train_step(model, optimizer, strategy, config)
    eval_fn = make_eval_step(model, strategy, config)
    tb_dir = os.path.join(workdir, "tb")
    writer = tf.summary.create_file_writer(tb_dir)
    tb_lib.write_hparams(writer, config)
    profile_steps = tb_lib.parse_profile_steps(config.profile_steps)
    profiler = (tb_lib.profile(tb_dir, *profile_steps) if profile_steps
                else None)
    checkpoint_every = int(config.checkpoint_every)
    log_every = max(int(config.log_every), 1)
    verbose = 1 if sys.stdout.isatty() else 2
    step = start_step
    last = {}
    skips, preempted = 0, None
    max_skips = int(config.max_consecutive_skips)

    # SIGTERM (preemption) ends the run after the current step, saved.
    guard = checkpointing.PreemptionGuard().__enter__()
    try:
        for epoch in range(start_epoch, config.epochs):
            lr = cosine_lr(epoch, config.epochs, config.optim.lr,
                           config.optim.lr_min)
            rate = drop_path_at(epoch, config.epochs, config.model.drop_path)
            sgd.learning_rate.assign(lr)
            model.set_drop_path_rate(rate)
            skip = step - epoch * steps_per_epoch
            ds = data_lib.batches(
                train_data, config.batch_size, seed=config.seed, epoch=epoch,
                training=True, crop_padding=config.data.crop_padding,
                flip=config.data.flip, cutout=config.data.cutout,
                skip_batches=skip).take(steps_per_epoch - skip)
            ds = strategy.experimental_distribute_dataset(ds)
            print(f"epoch {epoch + 1}/{config.epochs} lr {lr:.5f} "
                  f"drop_path {rate:.3f}", flush=True)
            bar = keras.utils.Progbar(steps_per_epoch - skip,
                                      verbose=verbose)
            sums, count, start = {}, 0, time.time()
            for images, labels in ds:
                if profiler:
                    profiler(step)
                out = {k: float(v) for k, v in train_fn(
                    images, labels, tf.constant(step, tf.int64)).items()}
                step += 1
                global_step.assign(step)
                if out["skipped"]:
                    skips += 1
                    print(f"step {step} skipped: non-finite loss "
                          f"{out['loss']} or gradient norm "
                          f"{out['grad_norm']} ({skips} in a row)",
                          flush=True)
                    if skips >= max_skips:
                        # Nothing of the skipped steps was applied: the
                        # weights saved here are the last finite ones.
                        checkpoint.save(step)
                        raise TrainingDiverged(
                            f"{skips} consecutive training steps had a "
                            f"non-finite loss or gradient (epoch "
                            f"{epoch + 1}, step {step}); the weights "
                            f"before them are in {checkpoint.latest} "
                            "(lower optim.lr or check the data)")
                else:
                    skips = 0
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                    bar.update(count, [("loss", out["loss"]),
                                       ("acc", out["accuracy"])])
                if step % log_every == 0:
                    with writer.as_default(step=step):
                        tf.summary.scalar("train_step/loss", out["loss"])
                        tf.summary.scalar("train_step/accuracy",
                                          out["accuracy"])
                if checkpoint_every and step % checkpoint_every == 0:
                    checkpoint.save(step)
                if guard.requested:
                    break
            if guard.requested and step < (epoch + 1) * steps_per_epoch:
                # Preempted mid-epoch: the finished steps are saved; the
                # same command resumes from them. (At the end of an epoch
                # the epoch is completed first, so its record is kept.)
                checkpoint.save(step)
                preempted = guard.requested
                break
            train_time = time.time() - start
            val_loss, val_acc = evaluate_clean(eval_fn, strategy, test_data,
                                               config.eval_batch_size)
            record = {"epoch": epoch, "step": step, "lr": lr,
                      "drop_path_rate": rate}
            record.update({f"train_{k}": v / max(count, 1)
                           for k, v in sums.items()})
            record.update(test_loss=val_loss, test_accuracy=val_acc,
                          train_seconds=train_time)
            improved = val_acc > float(best.numpy())
            if improved:
                best.assign(val_acc)
            record["best_test_accuracy"] = float(best.numpy())
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            with writer.as_default(step=step):
                for k, v in record.items():
                    if k not in ("epoch", "step"):
                        tf.summary.scalar(f"epoch/{k}", v)
            writer.flush()
            _save_model(model, os.path.join(workdir, "model_last.keras"))
            if improved:
                _save_model(model, os.path.join(workdir, "model_best.keras"))
            checkpoint.save(step)
            print(f"  train loss {record.get('train_loss', float('nan')):.4f} "
                  f"acc {record.get('train_accuracy', float('nan')):.4f} | "
                  f"test loss {val_loss:.4f} acc {val_acc:.4f} "
                  f"(best {record['best_test_accuracy']:.4f}) "
                  f"{train_time:.1f}s", flush=True)
            last = record
            if guard.requested and epoch + 1 < config.epochs:
                preempted = guard.requested
                break
    finally:
        guard.__exit__()
        # A run that stops early still closes its trace.
        if profiler:
            profiler.stop()
        writer.flush()
    if preempted:
        return {"preempted": preempted, "steps": step, "workdir": workdir,
                "checkpoint": checkpoint.latest}
    if not last:  # already finished: report the last recorded epoch
        with open(metrics_path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        last = lines[-1] if lines else {"test_accuracy": float("nan")}
    summary = {"params": params, "macs": macs,
               "best_accuracy": float(best.numpy()),
               "last_accuracy": float(last["test_accuracy"]),
               "epochs": int(config.epochs), "steps": step,
               "image_size": size, "num_classes": info.num_classes,
               "class_names": list(info.class_names), "workdir": workdir}
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def main(config, args):
    """``e2rnas train --config=configs/train_X.py --workdir=DIR
    [--genotype=NAME_OR_JSON] [--overwrite]``."""
    if not args.workdir:
        raise ValueError("Expected --workdir=DIR for the run's outputs")
    config = config.copy_and_resolve_references()
    if args.genotype:
        # The command-line genotype (e.g. a search run's genotype.json)
        # replaces config.genotype, and is recorded as such.
        config.genotype = args.genotype
    summary = train(config, args.workdir, overwrite=args.overwrite)
    if summary.get("preempted"):
        print(f"e2rnas train: stopped by {summary['preempted']} after step "
              f"{summary['steps']}; checkpoint {summary['checkpoint']} "
              "saved. Resume by running the same command again.",
              flush=True)
        return 0
    print(f"e2rnas train: best test accuracy {summary['best_accuracy']:.4f}, "
          f"last {summary['last_accuracy']:.4f}; {summary['params']:,} "
          f"parameters, {summary['macs']:,} multiply-adds; outputs in "
          f"{args.workdir}")
    return 0
