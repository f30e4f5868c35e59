"""``e2rnas train``: retrain a genotype from scratch (DARTS protocol).

SGD with momentum 0.9, learning rate 0.025 annealed to 0 by a per-epoch
cosine, L2 weight decay 3e-4 added to the gradient (as PyTorch's SGD does),
gradient clipping at global norm 5, batch 96, cutout 16, drop-path rising
linearly from 0 to 0.2 over training and an auxiliary loss weighted 0.4.
Optionally adversarial training (``config.adv_train``): a share of every
batch is replaced by adversarial examples made against the current weights.

The optimiser is the search's (`optim.MomentumSGD`, PyTorch's semantics:
``w -= lr (m b + g + wd w)``); weight decay, as there, covers every
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

import dataclasses
import functools
import os
import time

import tensorflow as tf

from e2rnas_tf import data as data_lib
from e2rnas_tf import optim, runtime, schedules
from e2rnas_tf.runs import checkpoints as ckpt_lib
from e2rnas_tf.runs import context as run_lib
from e2rnas_tf.runs import files
from e2rnas_tf.runs import metrics as metrics_lib
from e2rnas_tf.runs import progress as progress_lib
from e2rnas_tf.runs import workdir as workdir_lib
from e2rnas_tf.search import objectives
from e2rnas_tf.space import costs
from e2rnas_tf.space import genotypes as genotypes_lib
from e2rnas_tf.space import model as model_lib

__all__ = ["TrainingDiverged", "drop_path_at", "main", "train"]

# Written by `train`; a workdir holding any of them belongs to some run.
# What the training step returns, in its order (see `make_train_step`).
STEP_METRICS = ("loss", "ce", "aux_ce", "accuracy", "grad_norm",
                "loss_scale", "skipped")
OUTPUTS = ("config.json", "genotype.json", "metrics.jsonl", "checkpoints",
           "tb", "model_last.keras", "model_best.keras", "summary.json")


class TrainingDiverged(ValueError):
    """The training loss became NaN or Inf."""


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


def _identity(config_dict, genotype):
    return workdir_lib.run_identity(config_dict, genotype=genotype.to_dict())


def _reader(workdir):
    """Reads a train workdir's identity: config.json and genotype.json."""
    def read(path):
        genotype = genotypes_lib.Genotype.load(
            os.path.join(workdir, "genotype.json"))
        return _identity(files.read_json(path), genotype)
    return read


# ---------------------------------------------------------------------------
# Steps.


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


def make_train_step(model, sgd, loss_scale, strategy, config):
    """The compiled training step.

    Runs in the caller's (cross-replica) context; the returned function
    calls the per-replica step through ``strategy.run``. Every replica
    all-reduces its gradients and scalars, so all compute the same update
    and write it through `optim.assign`.

    Args:
        model: a built `DerivedNetwork` created in ``strategy.scope()``.
        sgd: an `optim.MomentumSGD` over ``model.trainable_variables``.
        loss_scale: an `optim.DynamicLossScale` (enabled under
            ``mixed_float16``).
        strategy: the `tf.distribute.Strategy` the variables live in.
        config: the train config.

    Returns:
        ``step_fn(images, labels, step, lr) -> dict`` of float32 scalars:
        ``loss`` (total), ``ce``, ``aux_ce``, ``accuracy`` (on the trained
        batch), ``grad_norm`` (before clipping), ``loss_scale`` and
        ``skipped`` (1 if the loss or gradient was NaN/Inf: then nothing,
        batch-norm statistics included, was changed, and a loss scale was
        halved).
    """
    variables = model.trainable_variables
    aux_weight = float(config.model.auxiliary_weight)
    clip = float(config.optim.grad_clip)
    adv = config.adv_train
    replicas = strategy.num_replicas_in_sync
    per_replica = config.batch_size // replicas
    num_adv = int(round(adv.ratio * per_replica)) if adv.enabled else 0
    seed = int(config.seed)
    trainable = {id(v) for v in variables}
    # What a forward pass writes besides the update: batch-norm statistics.
    state = [v for v in model.weights if id(v) not in trainable]

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
            scaled = loss_scale.scale_loss(loss / replicas)
        grads = [tf.cast(g, tf.float32)
                 for g in tape.gradient(scaled, variables)]
        return (loss, ce, aux_ce, objectives.accuracy(logits, labels),
                loss_scale.unscale(grads))

    if scope == "replica":
        # One XLA program per device; the all-reduce and the update stay
        # outside it (`runtime.jit_scope`).
        replica_grads = runtime.per_replica_xla(replica_grads)

    def replica_step(images, labels, step, lr):
        # Runs once per replica, inside `strategy.run`.
        ctx = tf.distribute.get_replica_context()
        replica = tf.cast(ctx.replica_id_in_sync_group, tf.int64)
        saved = [tf.identity(optim.raw_variable(v)) for v in state]
        values = [tf.identity(optim.raw_variable(v)) for v in variables]
        scale_used = tf.identity(loss_scale.scale.read_value())
        loss, ce, aux_ce, accuracy, grads = replica_grads(
            images, labels, step, replica)
        # The global gradient (the sum over replicas) and the global means
        # of the scalars, so every replica takes the same decisions.
        grads, scalars = optim.all_reduce(
            (grads, [x / replicas for x in (loss, ce, aux_ce, accuracy)]))
        loss, ce, aux_ce, accuracy = scalars
        # Clip the global gradient, then L2 in the optimiser, as
        # torch.optim.SGD(weight_decay=...) after clip_grad_norm.
        grads, norm = tf.clip_by_global_norm(grads, clip)
        # The global norm is NaN/Inf iff a gradient entry is: one check.
        ok = tf.math.is_finite(loss) & tf.math.is_finite(norm)
        new_values, new_buffers = sgd.updates(values, grads, lr, apply=ok)
        scale_vars, scale_values = loss_scale.updates(ok)
        optim.assign(list(variables) + list(sgd.buffers) + scale_vars,
                     new_values + new_buffers + scale_values)
        # A skipped step leaves the batch-norm statistics as they were.
        optim.assign(state, [tf.where(ok, optim.raw_variable(v).read_value(),
                                      s) for v, s in zip(state, saved)])
        return {"loss": loss, "ce": ce, "aux_ce": aux_ce,
                "accuracy": accuracy, "grad_norm": norm,
                "loss_scale": scale_used,
                "skipped": 1.0 - tf.cast(ok, tf.float32)}

    def step_fn(images, labels, step, lr):
        out = strategy.run(replica_step, args=(images, labels, step, lr))
        # Every value was all-reduced inside the replicas: any copy will do.
        return {k: strategy.experimental_local_results(v)[0]
                for k, v in out.items()}

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


def evaluate_clean(eval_fn, strategy, test, batch_size, stop=None):
    """Clean ``(loss, accuracy)`` over a whole split; None if ``stop()``
    (polled before each batch) asked to stop."""
    ds = data_lib.batches(test, batch_size, seed=0, epoch=0, training=False)
    ds = ds.map(_pad_batch(batch_size))
    ds = strategy.experimental_distribute_dataset(ds)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for images, labels, valid in ds:
        if stop is not None and stop():
            return None
        out = eval_fn(images, labels, valid)
        for k in totals:
            totals[k] += float(out[k])
    count = max(totals["count"], 1.0)
    return totals["loss_sum"] / count, totals["correct"] / count


# ---------------------------------------------------------------------------
# The loop.


def _fingerprint(config, genotype, info):
    """What decides the checkpointed variables (see `runs.checkpoints`)."""
    return {"genotype": genotype.to_dict(), "dataset": info.name,
            "num_classes": info.num_classes, "image_size": info.image_size,
            "model": config.model.to_dict(),
            "mixed_precision": config.mixed_precision}


def train(config, workdir, *, overwrite=False):
    """Trains ``config.genotype`` from scratch and writes ``workdir``.

    Resumes from the latest checkpoint if ``workdir`` holds the same run
    (same config up to `runs.workdir`'s non-identity fields, same
    genotype); refuses a workdir holding a different run unless
    ``overwrite``, which deletes its training outputs first.

    Args:
        config: a train config (`config_lib.train_config`).
        workdir: output directory.
        overwrite: replace a different run's outputs in ``workdir``.

    Returns:
        A dict: ``params`` (without the auxiliary head), ``macs`` (one
        inference forward of one image at the data's size),
        ``best_accuracy``, ``last_accuracy`` (clean test accuracy),
        ``epochs``, ``steps``, ``image_size``, ``num_classes``,
        ``class_names``, ``workdir``; or, when a signal stopped it,
        ``stopped`` (the signal's name), ``steps``, ``checkpoint`` and
        ``workdir``.

    Example:

    >>> config = config_lib.train_config()
    >>> config.data.image_size, config.epochs = 16, 1
    >>> train(config, "/tmp/run")["best_accuracy"]  # doctest: +SKIP
    """
    _check_config(config)
    # Every worker of a multi-worker run decides from the chief's workdir;
    # only the chief writes there, the others into scratch directories.
    chief_dir = workdir
    workdir = runtime.output_dir(config, chief_dir)
    genotype = genotypes_lib.get(config.genotype)
    # Refuse a foreign workdir before the slow set-up, but write to it only
    # once the data loaded, so that a config the data rejects can be fixed
    # and rerun in the same workdir.
    claim = workdir_lib.claim(
        chief_dir, _identity(config.to_dict(), genotype),
        record="config.json", read=_reader(chief_dir), outputs=OUTPUTS,
        overwrite=overwrite)
    with runtime.configured(config):
        return _train(config, workdir, chief_dir, genotype, claim)


def _steps_per_epoch(config, train_data, replicas):
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % replicas:
            raise ValueError(
                f"Expected config.{name} divisible by the {replicas} "
                f"replicas. Received: {name}={config[name]}")
    data_lib.check_batch_fits(config.batch_size, {"training": len(train_data)})
    available = data_lib.steps_per_epoch(len(train_data), config.batch_size,
                                         training=True)
    steps_per_epoch = int(config.steps_per_epoch) or available
    if steps_per_epoch > available:
        raise ValueError(
            f"Expected config.steps_per_epoch <= {available} (batches of "
            f"{config.batch_size} in {len(train_data)} training images). "
            f"Received: steps_per_epoch={config.steps_per_epoch}")
    return steps_per_epoch


@dataclasses.dataclass(frozen=True)
class _State:
    """Everything a training run updates and checkpoints."""

    model: model_lib.DerivedNetwork
    sgd: optim.MomentumSGD
    loss_scale: optim.DynamicLossScale
    global_step: tf.Variable
    # Epochs whose end-of-epoch work (evaluation, metrics, models) is done:
    # a run killed between an epoch's last step and that work resumes into
    # it.
    epochs_done: tf.Variable
    best: tf.Variable
    # The current epoch's sums of the step metrics (`STEP_METRICS`) and
    # their count: a run resumed mid-epoch reports the same epoch averages.
    epoch_sums: tf.Variable
    epoch_count: tf.Variable

    def checkpoint(self, directory, fingerprint):
        return ckpt_lib.RunCheckpoint(
            os.path.join(directory, "checkpoints"),
            {"model": ckpt_lib.variables_by_path(self.model),
             "optimizer": ckpt_lib.numbered_variables(self.sgd),
             "loss_scale": ckpt_lib.numbered_variables(self.loss_scale),
             "step": self.global_step, "epochs_done": self.epochs_done,
             "best_accuracy": self.best, "epoch_sums": self.epoch_sums,
             "epoch_count": self.epoch_count},
            fingerprint=fingerprint, max_to_keep=3)


def _build(config, genotype, info, strategy):
    # Every variable (model, optimizer, counters) is created in scope so
    # that it is mirrored across replicas.
    with strategy.scope():
        model = model_lib.DerivedNetwork(
            genotype, channels=config.model.channels,
            num_classes=info.num_classes, layers=config.model.layers,
            auxiliary=config.model.auxiliary, mean=info.mean, std=info.std,
            drop_path=0.0, name="derived_network")
        model.build((None, info.image_size, info.image_size, 3))
        sgd = optim.MomentumSGD(model.trainable_variables,
                                config.optim.momentum,
                                config.optim.weight_decay)
        loss_scale = optim.DynamicLossScale(
            config.mixed_precision == "mixed_float16")
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name="global_step")
        # Epochs whose end-of-epoch work (evaluation, metrics, models) is
        # done: a run killed between an epoch's last step and that work
        # resumes into it.
        epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name="epochs_done")
        best = tf.Variable(-1.0, dtype=tf.float32, trainable=False,
                           name="best_accuracy")
        epoch_sums = tf.Variable(tf.zeros(len(STEP_METRICS), tf.float64),
                                 trainable=False, name="epoch_sums")
        epoch_count = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name="epoch_count")
    return _State(model, sgd, loss_scale, global_step, epochs_done, best,
                  epoch_sums, epoch_count)


def _train(config, workdir, chief_dir, genotype, claim):
    chief = workdir == chief_dir
    config_dict = config.to_dict()
    # Before any TensorFlow op: MultiWorkerMirroredStrategy configures the
    # collective ops, which is possible only at program start.
    strategy = runtime.make_strategy(config)
    train_data, test_data, info = data_lib.load(config.data)
    replicas = strategy.num_replicas_in_sync
    steps_per_epoch = _steps_per_epoch(config, train_data, replicas)
    size = info.image_size
    state = _build(config, genotype, info, strategy)
    model, global_step, best = state.model, state.global_step, state.best
    fingerprint = _fingerprint(config, genotype, info)

    with run_lib.Run(workdir, config, scratch=not chief,
                     strategy=strategy) as run:
        # From here on the run owns the workdir.
        if chief:
            workdir_lib.clear(workdir, claim.stale)
            os.makedirs(workdir, exist_ok=True)
            files.write_json(os.path.join(workdir, "config.json"),
                             config_dict)
            genotype.save(os.path.join(workdir, "genotype.json"))
        checkpoint = state.checkpoint(workdir, fingerprint)
        if claim.resume:
            # A non-chief worker resumes from the chief's checkpoints.
            (checkpoint if chief
             else state.checkpoint(chief_dir, fingerprint)).restore()
        step = int(global_step.numpy())
        start_epoch = int(state.epochs_done.numpy())
        run.open(keep=(lambda r: r["epoch"] < start_epoch)
                 if claim.resume else None)

        params = costs.count_params(model)
        macs = costs.count_inference_macs(model, size)
        print(f"e2rnas train: {info.name} {info.num_train}/{info.num_test} "
              f"images {size}x{size}, {config.model.layers} cells C="
              f"{config.model.channels}, {params / 1e6:.3f}M params, "
              f"{macs / 1e6:.1f}M multiply-adds, {replicas} replica(s)"
              + (f", resuming at epoch {start_epoch + 1}"
                 if step and start_epoch < config.epochs else "")
              + (", already complete" if start_epoch >= config.epochs
                 else ""), flush=True)

        train_fn = make_train_step(model, state.sgd, state.loss_scale,
                                   strategy, config)
        eval_fn = make_eval_step(model, strategy, config)
        progress = progress_lib.Progress(
            config.epochs * steps_per_epoch, step,
            every=max(int(config.log_every), 1))
        if start_epoch < config.epochs:
            print("the first step compiles the training step (tens of "
                  "seconds on a CPU)", flush=True)
        last = {}
        for epoch in range(start_epoch, config.epochs):
            lr = schedules.cosine_lr(epoch, config.epochs, config.optim.lr,
                                     config.optim.lr_min)
            rate = drop_path_at(epoch, config.epochs, config.model.drop_path)
            model.set_drop_path_rate(rate)
            skip = step - epoch * steps_per_epoch
            ds = data_lib.batches(
                train_data, config.batch_size, seed=config.seed, epoch=epoch,
                training=True, crop_padding=config.data.crop_padding,
                flip=config.data.flip, cutout=config.data.cutout,
                skip_batches=skip).take(steps_per_epoch - skip)
            ds = strategy.experimental_distribute_dataset(ds)
            progress.begin(steps_per_epoch,
                           f"epoch {epoch + 1}/{config.epochs} lr {lr:.5f} "
                           f"drop_path {rate:.3f}", done=skip)
            start = time.time()
            step, sums, count = _train_epoch(
                run, functools.partial(train_fn, lr=tf.constant(
                    lr, tf.float32)),
                ds, steps_per_epoch - skip, step, state, checkpoint,
                progress, epoch * steps_per_epoch, resumed=skip > 0)
            if step < (epoch + 1) * steps_per_epoch:
                # Stopped mid-epoch: the finished steps are saved; the same
                # command resumes from them.
                checkpoint.save(step)
                return _stopped(run, step, workdir, checkpoint)
            record = {"epoch": epoch, "step": step, "lr": lr,
                      "drop_path_rate": rate,
                      **({f"train_{k}": sums[k] / count
                          for k in STEP_METRICS} if count else {}),
                      "train_seconds": time.time() - start}
            print(f"  evaluating on {len(test_data)} test images", flush=True)
            done = _end_of_epoch(run, state, record, lambda: evaluate_clean(
                eval_fn, strategy, test_data, config.eval_batch_size,
                stop=lambda: run.poll()[1]), workdir if chief else None)
            checkpoint.save(step)
            run.saved()
            if not done:
                # Stopped during the evaluation: the resumed run redoes the
                # epoch's end.
                return _stopped(run, step, workdir, checkpoint)
            last = record
            if run.poll(step)[1] and epoch + 1 < config.epochs:
                return _stopped(run, step, workdir, checkpoint)
        if not last:  # already finished: report the last recorded epoch
            records = metrics_lib.read(os.path.join(workdir,
                                                    "metrics.jsonl"))
            last = records[-1] if records else {"test_accuracy": float("nan")}
        summary = {"params": params, "macs": macs,
                   "best_accuracy": float(best.numpy()),
                   "last_accuracy": float(last["test_accuracy"]),
                   "epochs": int(config.epochs), "steps": step,
                   "image_size": size, "num_classes": info.num_classes,
                   "class_names": list(info.class_names), "workdir": workdir}
        if chief:
            files.write_json(os.path.join(workdir, "summary.json"), summary)
        return summary


def _stopped(run, step, workdir, checkpoint):
    return {"stopped": run.stop_requested, "steps": step, "workdir": workdir,
            "checkpoint": checkpoint.latest}


def _end_of_epoch(run, state, record, evaluate, workdir):
    """Evaluates, records the epoch (``record`` completed with the test
    figures) and writes the models (``workdir``: None for a non-chief
    worker); marks the epoch done. False if a stop request interrupted the
    evaluation (nothing recorded)."""
    result = evaluate()
    if result is None:
        return False
    val_loss, val_acc = result
    record.update(test_loss=val_loss, test_accuracy=val_acc)
    improved = val_acc > float(state.best.numpy())
    if improved:
        state.best.assign(val_acc)
    record["best_test_accuracy"] = float(state.best.numpy())
    run.metrics.write(record)
    run.scalars(record["step"], {k: v for k, v in record.items()
                                 if k not in ("epoch", "step")},
                prefix="epoch/")
    run.writer.flush()
    if workdir is not None:
        files.save_keras(state.model,
                         os.path.join(workdir, "model_last.keras"))
        if improved:
            files.save_keras(state.model,
                             os.path.join(workdir, "model_best.keras"))
    state.epochs_done.assign(record["epoch"] + 1)
    print(f"  train loss {record.get('train_loss', float('nan')):.4f} acc "
          f"{record.get('train_accuracy', float('nan')):.4f} | test loss "
          f"{val_loss:.4f} acc {val_acc:.4f} (best "
          f"{record['best_test_accuracy']:.4f}) "
          f"{record['train_seconds']:.1f}s", flush=True)
    return True


def _step_line(in_epoch, steps, sums, count):
    """A progress line (piped output): the epoch's mean loss and accuracy
    so far."""
    count = max(count, 1)
    return (f"  step {in_epoch}/{steps} loss {sums['loss'] / count:.4f}"
            f" acc {sums['accuracy'] / count:.4f}")


def _train_epoch(run, train_fn, ds, steps, step, state, checkpoint,
                 progress, epoch_start, resumed):
    """One epoch's steps (the epoch starts at global step
    ``epoch_start``); returns ``(step, sums, count)`` of the whole epoch
    (``resumed``: continuing the epoch whose sums are in ``state``). Stops
    early (``step`` short of the epoch's end) when the run is asked to
    stop."""
    log_every = progress.every
    global_step = state.global_step
    if resumed:
        count = int(state.epoch_count.numpy())
        sums = dict(zip(STEP_METRICS, state.epoch_sums.numpy().tolist()))
    else:
        count, sums = 0, dict.fromkeys(STEP_METRICS, 0.0)
    taken = 0
    for images, labels in ds:
        with run.trace(step):
            out = {k: float(v) for k, v in train_fn(
                images, labels, tf.constant(step, tf.int64)).items()}
        step += 1
        taken += 1
        global_step.assign(step)
        skips = run.count_skip(out["skipped"])
        if out["skipped"]:
            print(f"step {step} skipped: non-finite loss {out['loss']} or "
                  f"gradient norm {out['grad_norm']} ({skips} in a row)",
                  flush=True)
            if skips >= run.skip_limit:
                # Nothing of the skipped steps was applied: the weights
                # saved here are the last finite ones.
                checkpoint.save(step)
                raise TrainingDiverged(
                    f"{skips} consecutive training steps had a non-finite "
                    f"loss or gradient (step {step}); the weights before "
                    f"them are in {checkpoint.latest} (lower optim.lr or "
                    "check the data)")
        else:
            for k in STEP_METRICS:
                sums[k] += out[k]
            count += 1
        # Every step, so that any checkpoint holds this epoch's sums.
        state.epoch_sums.assign([sums[k] for k in STEP_METRICS])
        state.epoch_count.assign(count)
        in_epoch = step - epoch_start
        progress.update(
            in_epoch, [("loss", out["loss"]), ("acc", out["accuracy"])],
            line=functools.partial(_step_line, in_epoch, progress.part_units,
                                   sums, count))
        if step % log_every == 0:
            run.scalars(step, {"loss": out["loss"],
                               "accuracy": out["accuracy"]},
                        prefix="train_step/")
        save, stop = run.poll(step)
        if save:
            checkpoint.save(step)
        if stop and taken < steps:
            break
    return step, sums, count


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
    if summary.get("stopped"):
        print(f"e2rnas train: stopped by {summary['stopped']} after step "
              f"{summary['steps']}; checkpoint {summary['checkpoint']} "
              "saved. Resume by running the same command again.",
              flush=True)
        return run_lib.EXIT_CODES.get(summary["stopped"], 1)
    print(f"e2rnas train: best test accuracy {summary['best_accuracy']:.4f}, "
          f"last {summary['last_accuracy']:.4f}; {summary['params']:,} "
          f"parameters, {summary['macs']:,} multiply-adds; outputs in "
          f"{args.workdir}")
    return 0
