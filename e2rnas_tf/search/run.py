"""The E2RNAS search run: ``e2rnas search`` and `search(config, workdir)`.

A run trains the supernet (weights ``w`` on one half of the training set,
architecture ``alpha`` on the other, see `search_step.SearchStep`) and
writes into its work directory:

- ``config.json``: the resolved config;
- ``metrics.jsonl``: one line per step (every objective, its MGDA weight,
  the learning rates, skipped steps) and one per epoch (``"kind": "epoch"``:
  supernet accuracy, derived genotype and its parameter count);
- ``genotypes/epoch_NNN.json`` and the final ``genotype.json``;
- ``alpha_history.npz``: ``alpha_normal`` / ``alpha_reduce``
  ``[epochs, edges, ops]`` snapshots at the end of each epoch;
- ``checkpoints/``: verified `runs.checkpoints.RunCheckpoint`s of every
  network variable (weights and alphas, by Keras path), both optimizers
  and the step/epoch counters;
- ``tb/``: TensorBoard: every step's scalars (objectives, MGDA weights,
  learning rates, alpha entropy per cell type, skip connections and
  ``derived/params``, the parameters of the current derived genotype),
  per epoch alpha heat maps,
  cell diagrams and the genotype as text, the config as hparams, and a
  profiler trace for ``config.profile_steps="START,END"``;
- ``plots/``: cell diagrams of the final genotype, alpha evolution and the
  objectives / MGDA weights over steps (`plots.plot_run`).

A work directory that holds the same config resumes from its last
checkpoint; one that holds a different config is refused unless
``--overwrite``.

Reference:
    Yue, Lin, Huang, Zhang. Effective, Efficient and Robust Neural
    Architecture Search. https://arxiv.org/abs/2011.09820
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import time

import numpy as np
import tensorflow as tf

from e2rnas_tf import data as data_lib
from e2rnas_tf import plots as plots_lib
from e2rnas_tf import runtime
from e2rnas_tf import tensorboard as tb_lib
from e2rnas_tf.runs import checkpoints as ckpt_lib
from e2rnas_tf.runs import context as run_lib
from e2rnas_tf.runs import files
from e2rnas_tf.runs import progress as progress_lib
from e2rnas_tf.runs import workdir as workdir_lib
from e2rnas_tf.search import ood as ood_lib
from e2rnas_tf.search import resources
from e2rnas_tf.search import step as step_lib
from e2rnas_tf.space import genotypes
from e2rnas_tf.space.costs import count_params
from e2rnas_tf.space.search_space import SearchNetwork

EVAL_SPLITS = ("test", "valid")


# What a search writes into its work directory (`runs.workdir.claim`).
OUTPUTS = ("config.json", "genotype.json", "genotypes", "metrics.jsonl",
           "alpha_history.npz", "checkpoints", "tb", "plots")


def _config_json(config):
    return config.to_json_best_effort(sort_keys=True, indent=2) + "\n"


def _read_identity(path):
    return workdir_lib.run_identity(files.read_json(path))


def _fingerprint(config, info):
    """What decides the checkpointed variables (see `runs.checkpoints`)."""
    return {"model": config.model.to_dict(),
            "objectives": list(config.objectives),
            "dataset": info.name, "num_classes": info.num_classes,
            "image_size": info.image_size,
            "mixed_precision": config.mixed_precision}


def build_network(config, info):
    """The supernet of ``config.model`` for a data set, built."""
    m = config.model
    net = SearchNetwork(
        channels=m.channels, num_classes=info.num_classes, layers=m.layers,
        steps=m.steps, multiplier=m.multiplier,
        stem_multiplier=m.stem_multiplier, primitives=m.primitives,
        mean=info.mean, std=info.std, alpha_seed=int(config.seed),
        cell_impl=m.cell_impl,
        # A fixed name: checkpoints key variables by their Keras path,
        # which starts with the model's name, and Keras would number a
        # second supernet of the same process ("search_network_1"), so a
        # search resumed in-process (a pipeline, a notebook) could not
        # read its own checkpoints.
        name="search_network")
    net.build((None, info.image_size, info.image_size, 3))
    return net


def derive_genotype(network, config):
    """The DARTS-rule genotype of the supernet's current softmaxed alphas."""
    w_normal, w_reduce = network.op_weights()
    return genotypes.derive(w_normal.numpy(), w_reduce.numpy(),
                            config.model.primitives, config.model.multiplier)


def genotype_params(genotype, table, primitives):
    """Parameters (millions) of a genotype's derived network for ``table``."""
    w_normal, w_reduce = resources.genotype_weights(genotype, primitives)
    return float(resources.expected_cost(w_normal, w_reduce, table))


def make_eval_step(network, batch_size):
    """A compiled supernet evaluation (inference-mode BN) on padded batches.

    Every batch has ``batch_size`` rows (the last one padded and masked),
    so the function is traced once.
    """
    def step(images, labels, mask):
        logits = network(images, training=False)
        hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                labels), tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=logits)
        return tf.reduce_sum(hits * mask), tf.reduce_sum(ce * mask)

    compiled = tf.function(step, autograph=False)

    def evaluate(split, stop=None):
        """``(accuracy, loss)`` on ``split``; None if ``stop()`` (polled
        before each batch) asked to stop."""
        correct = loss = 0.0
        n = len(split)
        for start in range(0, n, batch_size):
            if stop is not None and stop():
                return None
            x = split.images[start:start + batch_size]
            y = split.labels[start:start + batch_size]
            mask = np.ones(batch_size, np.float32)
            if len(y) < batch_size:
                pad = batch_size - len(y)
                mask[len(y):] = 0.0
                x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
                y = np.concatenate([y, np.zeros(pad, y.dtype)])
            c, l = compiled(tf.constant(x, tf.float32) / 255.0,
                            tf.constant(y, tf.int32), tf.constant(mask))
            correct += float(c)
            loss += float(l)
        return correct / n, loss / n

    return evaluate


def _progress_line(epoch, epochs, step, steps, metrics, objectives, rate):
    objs = " ".join(f"{name} {metrics[f'objective/{name}']:.3f}"
                    + ("" if metrics.get(f"active/{name}", 1.0) else "(off)")
                    for name in objectives)
    weights = "/".join(f"{metrics[f'weight/{name}']:.2f}"
                       for name in objectives)
    line = (f"epoch {epoch + 1}/{epochs} step {step}/{steps} | {objs} | "
            f"mgda {weights} | derived {metrics['derived/params']:.2f}M | "
            f"train {metrics['train/loss']:.3f} "
            f"acc {metrics['train/acc']:.2f} | lr {metrics['lr']:.4f} | "
            f"{rate:.2f} s/step")
    return line


def _bar_values(metrics, objectives):
    """The progress bar's figures: each objective and the derived size."""
    return ([(name, metrics[f"objective/{name}"]) for name in objectives]
            + [("derived_M", metrics["derived/params"]),
               ("train_loss", metrics["train/loss"])])


def _skip_error(metrics, objectives, limit):
    culprits = [name for name in list(objectives) + ["train"]
                if metrics.get(f"nonfinite/{name}")]
    return step_lib.SearchDivergedError(
        f"the search skipped {limit} consecutive steps with non-finite "
        f"values (objectives: {', '.join(culprits) or 'unknown'}); lower "
        "the learning rates or check the data")


def covered(steps, epochs):
    """The metric lines a checkpoint after ``steps`` steps and ``epochs``
    finished epochs covers: a resumed run writes the others again."""
    def keep(record):
        if record.get("kind") == "step":
            return record.get("step", 0) <= steps
        return record.get("epoch", 0) <= epochs
    return keep


def search(config, workdir, *, overwrite=False, log=print):
    """Runs an E2RNAS search and writes its results into ``workdir``.

    Args:
        config: a locked `config_lib.search_config()`-style config.
        workdir: the run directory (created if needed). One that holds
            this run (the same config, up to `runs.workdir`'s
            non-identity fields) resumes from its last checkpoint; one that
            holds another run is refused unless ``overwrite``.
        overwrite: replace the outputs of another run in ``workdir``.
        log: where progress lines go (a print-like callable).

    Returns:
        A dict: ``genotype`` (`genotypes.Genotype`), ``genotype_params``
        (millions, at ``config.resource`` scale), ``epochs`` (per-epoch
        summaries), ``steps``, ``compile_seconds``, ``workdir``; or, when
        a signal stopped it, ``stopped`` (the signal's name), ``steps``,
        ``checkpoint`` and ``workdir``.

    Example:

    >>> from configs import search_demo
    >>> result = search(search_demo.get_config(), "runs/demo")
    >>> result["genotype"].normal[:2]

    Reference:
        https://arxiv.org/abs/2011.09820
    """
    step_lib.check_objectives(config.objectives)
    if config.eval_on not in EVAL_SPLITS:
        raise ValueError(f"Expected config.eval_on in {list(EVAL_SPLITS)}. "
                         f"Received: {config.eval_on!r}")
    # Only the chief of a multi-worker run writes the workdir; the others
    # follow its decisions (resume or not) and write scratch directories.
    chief_dir = workdir
    workdir = runtime.output_dir(config, chief_dir)
    # Refuse another run's workdir before the slow set-up; write to it only
    # once the data loaded and the network was built, so that a config
    # the data reject can be fixed and rerun in the same workdir. (Pure
    # Python: no TensorFlow op may run before the multi-worker strategy.)
    claim = workdir_lib.claim(
        chief_dir, workdir_lib.run_identity(config.to_dict()),
        record="config.json", read=_read_identity, outputs=OUTPUTS,
        overwrite=overwrite)
    with runtime.configured(config):
        return _search(config, workdir, chief_dir, claim, log)


@dataclasses.dataclass(frozen=True)
class _SearchData:
    """A search's data: the two halves of the training set, the split the
    per-epoch accuracy is measured on, and the epoch's length."""

    info: data_lib.DatasetInfo
    weights: data_lib.ArrayData
    arch: data_lib.ArrayData
    evaluation: data_lib.ArrayData
    steps_per_epoch: int


def _load_data(config, strategy):
    train, test, info = data_lib.load(config.data)
    w_split, a_split = data_lib.search_split(
        train, config.data.train_portion, config.seed)
    batch = int(config.batch_size)
    data_lib.check_batch_fits(
        batch, {"weight-training": len(w_split), "architecture": len(a_split)},
        f" in a search split (data.train_portion={config.data.train_portion})")
    available = min(data_lib.steps_per_epoch(len(w_split), batch, True),
                    data_lib.steps_per_epoch(len(a_split), batch, True))
    steps_per_epoch = int(config.steps_per_epoch) or available
    if steps_per_epoch > available:
        raise ValueError(
            f"Expected config.steps_per_epoch <= {available} (batches in the "
            f"smaller search split). Received: {steps_per_epoch}")
    if batch % strategy.num_replicas_in_sync:
        raise ValueError(
            f"Expected config.batch_size divisible by the "
            f"{strategy.num_replicas_in_sync} replicas. Received: {batch}")
    return _SearchData(info, w_split, a_split,
                       test if config.eval_on == "test" else a_split,
                       steps_per_epoch)


def _epoch_batches(data, ood_data, config, epoch, skip, strategy):
    """The weight, architecture and OOD batches of one epoch after
    ``skip`` steps (OOD: None without OOD data)."""
    batch = int(config.batch_size)
    aug = dict(crop_padding=config.data.crop_padding, flip=config.data.flip,
               cutout=config.data.cutout)
    w_ds = data_lib.batches(data.weights, batch, seed=config.seed,
                            epoch=epoch, training=True, skip_batches=skip,
                            **aug)
    # A different seed, so the two splits are not shuffled alike.
    a_ds = data_lib.batches(data.arch, batch, seed=config.seed + 1,
                            epoch=epoch, training=True, skip_batches=skip,
                            **aug)
    o_ds = None
    if ood_data is not None:
        o_ds = ood_lib.batches(ood_data, batch, seed=config.seed, epoch=epoch,
                               steps=data.steps_per_epoch, skip_batches=skip)
    if strategy.num_replicas_in_sync > 1:
        w_ds, a_ds, o_ds = (None if d is None
                            else strategy.experimental_distribute_dataset(d)
                            for d in (w_ds, a_ds, o_ds))
    return w_ds, a_ds, o_ds


def _search(config, workdir, chief_dir, claim, log):
    objectives = step_lib.check_objectives(config.objectives)
    strategy = runtime.make_strategy(config)
    data = _load_data(config, strategy)
    info, steps_per_epoch = data.info, data.steps_per_epoch
    with strategy.scope():
        net = build_network(config, info)
        step = step_lib.SearchStep(
            net, config, num_classes=info.num_classes,
            image_size=info.image_size, steps_per_epoch=steps_per_epoch,
            strategy=strategy)
        # Epochs whose end-of-epoch work (snapshot, genotype, evaluation,
        # metrics) is done: a run killed between an epoch's last step and
        # that work resumes into it.
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False,
                                name="epoch")
    # The derived genotype's size, millions at the evaluation scale.
    params_table = step.report_table
    ood_data = (ood_lib.load(config.ood, info.image_size, config.seed)
                if step.needs_ood else None)

    # Every supernet variable by its Keras path (tf.train.Checkpoint of
    # the network itself would skip the cells, held in a list), and the
    # step's own state (counters, both optimizers) by position and name.
    def run_checkpoint(directory):
        return ckpt_lib.RunCheckpoint(
            os.path.join(directory, "checkpoints"),
            {"network": ckpt_lib.variables_by_path(net),
             "search_step": ckpt_lib.numbered_variables(step),
             "epoch": epoch_var},
            fingerprint=_fingerprint(config, info), max_to_keep=3, log=log)

    chief = workdir == chief_dir
    with run_lib.Run(workdir, config, scratch=not chief, strategy=strategy,
                     log=log) as run:
        # The set-up succeeded: from here on the run owns the workdir.
        if chief:
            workdir_lib.clear(workdir, claim.stale)
            files.write_text(os.path.join(workdir, "config.json"),
                             _config_json(config))
        # Every worker writes the per-epoch genotypes (a non-chief one into
        # its scratch directory).
        os.makedirs(os.path.join(workdir, "genotypes"), exist_ok=True)
        checkpoint = run_checkpoint(workdir)
        # A non-chief worker resumes from the chief's checkpoints.
        source = checkpoint if chief else run_checkpoint(chief_dir)
        resume = claim.resume and source.restore() is not None
        done = int(step.iterations.numpy())
        start_epoch = int(epoch_var.numpy())
        history = _AlphaHistory(os.path.join(workdir, "alpha_history.npz"),
                                start_epoch if resume else 0)
        if resume:
            if start_epoch >= int(config.epochs):
                log(f"{workdir} holds a finished run of this config; "
                    "re-deriving its genotype")
            else:
                log(f"resuming {workdir} at epoch {start_epoch + 1}, "
                    f"step {done}")
        # Lines written after the restored checkpoint (a run killed between
        # checkpoints) are dropped: the resumed run writes them again.
        run.open(keep=covered(done, start_epoch) if resume else None)
        log(f"search: {info.name} {info.image_size}x{info.image_size}, "
            f"{len(data.weights)} weight / {len(data.arch)} arch examples, "
            f"{config.model.layers} cells C={config.model.channels}, "
            f"batch {config.batch_size}, {steps_per_epoch} steps/epoch, "
            f"{config.epochs} epochs, objectives {list(objectives)} "
            f"({config.combine.method}, {config.arch.order} order), "
            f"{count_params(net.weight_variables):,} weights")
        loop = _Loop(run, step, net, config, checkpoint, log)
        evaluate = make_eval_step(net, int(config.eval_batch_size))
        epochs_summary = []
        for epoch in range(start_epoch, int(config.epochs)):
            skip = done - epoch * steps_per_epoch
            finished = loop.epoch(epoch, steps_per_epoch - skip,
                                  *_epoch_batches(data, ood_data, config,
                                                  epoch, skip, strategy))
            done = int(step.iterations.numpy())
            if not finished:
                # Stopped mid-epoch: the finished steps are saved; the same
                # command resumes from them.
                checkpoint.save(done)
                return _stopped(run, done, checkpoint, workdir)
            log(f"epoch {epoch + 1}: evaluating the supernet on "
                f"{len(data.evaluation)} {config.eval_on} images")
            summary = _end_of_epoch(
                epoch, net, config, params_table, evaluate, data.evaluation,
                workdir, history, stop=lambda: run.poll()[1])
            if summary is None:
                # Stopped during the evaluation: the epoch's steps are
                # saved; the resumed run redoes its end.
                checkpoint.save(done)
                return _stopped(run, done, checkpoint, workdir)
            epochs_summary.append(summary)
            _record_epoch(run, done, summary, net, config, log)
            epoch_var.assign(epoch + 1)
            checkpoint.save(done)
            run.saved()
            if run.poll(done)[1] and epoch + 1 < int(config.epochs):
                return _stopped(run, done, checkpoint, workdir)

        genotype = derive_genotype(net, config)
        if chief:
            genotype.save(os.path.join(workdir, "genotype.json"))
        params = genotype_params(genotype, params_table,
                                 config.model.primitives)
        log(f"genotype: {genotype.to_json()}")
        log(f"expected parameters: {params:.3f}M (derived network, "
            f"{config.resource.layers} cells, C={config.resource.channels})")
        if chief:
            plots_lib.plot_run(workdir, os.path.join(workdir, "plots"))
        log(f"results in {workdir}: genotype.json, metrics.jsonl, "
            "alpha_history.npz, plots/, checkpoints/, tb/")
        return dict(genotype=genotype, genotype_params=params,
                    epochs=epochs_summary, steps=done,
                    compile_seconds=loop.compile_seconds, workdir=workdir)


def _stopped(run, steps, checkpoint, workdir):
    return dict(stopped=run.stop_requested, steps=steps,
                checkpoint=checkpoint.latest, workdir=workdir)


class _Loop:
    """The steps of a search's epochs: metrics, logs, progress, skips,
    checkpoints and stop requests."""

    def __init__(self, run, step, net, config, checkpoint, log):
        self.run, self.step, self.net = run, step, net
        self.config, self.checkpoint, self.log = config, checkpoint, log
        self.objectives = step.objectives
        self.compile_seconds = None
        spe = step.steps_per_epoch
        self.progress = progress_lib.Progress(
            int(config.epochs) * spe, int(step.iterations.numpy()), log=log,
            every=max(int(config.log_every), 1))

    def epoch(self, epoch, steps, w_ds, a_ds, o_ds):
        """Runs ``steps`` steps; False if a stop request ended it early."""
        cfg, run = self.config, self.run
        spe = self.step.steps_per_epoch
        self.progress.begin(spe, done=spe - steps)
        o_iter = iter(o_ds) if o_ds is not None else None
        self._tic, self._since_line, taken = time.perf_counter(), 0, 0
        for train_batch, valid_batch in zip(w_ds, a_ds):
            if taken >= steps:
                break
            number = int(self.step.iterations.numpy())
            if self.compile_seconds is None:
                self.log("compiling the search step (tracing and the first "
                         "step; tens of seconds on a CPU)")
            t0 = time.perf_counter()
            with run.trace(number):
                out = self.step(train_batch, valid_batch,
                                next(o_iter) if o_iter is not None else None)
                metrics = {k: float(v) for k, v in out.items()}
            taken += 1
            self._since_line += 1
            if self.compile_seconds is None:
                self.compile_seconds = time.perf_counter() - t0
                self.log(f"compiled in {self.compile_seconds:.1f} s "
                         "(trace + first step)")
                # The rate shown excludes the compilation.
                self._tic, self._since_line = time.perf_counter(), 0
            global_step = number + 1
            run.metrics.write({"kind": "step", "step": global_step,
                               "epoch": epoch + 1, **metrics})
            run.scalars(global_step, {
                **metrics, **_architecture_scalars(self.net, cfg)})
            self._check_skips(global_step, metrics)
            in_epoch = global_step - epoch * spe
            self.progress.update(
                in_epoch, _bar_values(metrics, self.objectives),
                line=functools.partial(self._line, epoch, in_epoch, metrics))
            save, stop = run.poll(global_step)
            if save:
                self.checkpoint.save(global_step)
            if stop and taken < steps:
                return False
        return True

    def _line(self, epoch, in_epoch, metrics):
        """The progress line (piped output), with the rate of the steps
        since the previous line."""
        now = time.perf_counter()
        rate = (now - self._tic) / max(self._since_line, 1)
        self._tic, self._since_line = now, 0
        return _progress_line(epoch, self.config.epochs, in_epoch,
                              self.step.steps_per_epoch, metrics,
                              self.objectives, rate)

    def _check_skips(self, global_step, metrics):
        skips = self.run.count_skip(metrics["skipped"])
        if metrics["skipped"]:
            culprits = [n for n in list(self.objectives) + ["train"]
                        if metrics[f"nonfinite/{n}"]]
            self.log(f"step {global_step} skipped: non-finite "
                     f"{', '.join(culprits) or 'update'} "
                     f"({skips} in a row)")
        if skips >= self.run.skip_limit:
            # Skipped steps change nothing: this checkpoint holds the last
            # finite state.
            self.checkpoint.save(global_step)
            self.log(f"last finite state saved in {self.checkpoint.latest}")
            raise _skip_error(metrics, self.objectives, skips)


def _architecture_scalars(net, config):
    """Per-step TensorBoard scalars of the current architecture."""
    w_normal, w_reduce = net.op_weights()
    genotype = derive_genotype(net, config)
    return {
        "arch/entropy_normal": float(tb_lib.alpha_entropy(w_normal)),
        "arch/entropy_reduce": float(tb_lib.alpha_entropy(w_reduce)),
        "arch/skip_connections_normal": float(
            tb_lib.num_skip_connections(genotype, "normal")),
        "arch/skip_connections_reduce": float(
            tb_lib.num_skip_connections(genotype, "reduce")),
    }


class _AlphaHistory:
    """``alpha_history.npz``: alpha at the end of every finished epoch."""

    def __init__(self, path, keep_epochs):
        self.path = path
        self.arrays = {"alpha_normal": [], "alpha_reduce": []}
        if keep_epochs and os.path.exists(path):
            with np.load(path) as f:
                self.arrays = {k: list(f[k][:keep_epochs])
                               for k in self.arrays}

    def append(self, net):
        self.arrays["alpha_normal"].append(net.alpha_normal.numpy())
        self.arrays["alpha_reduce"].append(net.alpha_reduce.numpy())
        # Atomically: a kill mid-write must not leave a file the resumed
        # run cannot read.
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.stack(v) for k, v in self.arrays.items()})
        files.write_bytes(self.path, buffer.getvalue())


def _end_of_epoch(epoch, net, config, params_table, evaluate, eval_split,
                  workdir, history, stop):
    """The epoch's genotype, alpha snapshot and supernet evaluation; None
    if ``stop()`` interrupted the evaluation (the resumed run redoes it)."""
    genotype = derive_genotype(net, config)
    genotype.save(os.path.join(workdir, "genotypes",
                               f"epoch_{epoch + 1:03d}.json"))
    history.append(net)
    result = evaluate(eval_split, stop)
    if result is None:
        return None
    eval_acc, eval_loss = result
    return {"kind": "epoch", "epoch": epoch + 1, "eval_on": config.eval_on,
            "eval_acc": eval_acc, "eval_loss": eval_loss,
            "genotype_params": genotype_params(genotype, params_table,
                                               config.model.primitives),
            "genotype": genotype.to_dict()}


def _record_epoch(run, step, summary, net, config, log):
    """An epoch's line in metrics.jsonl, its TensorBoard summaries and its
    log line."""
    run.metrics.write(summary)
    run.scalars(step, {k: summary[k] for k in ("eval_acc", "eval_loss",
                                               "genotype_params")},
                prefix="epoch/")
    tb_lib.write_search_epoch_summaries(
        run.writer, step, *[w.numpy() for w in net.op_weights()],
        derive_genotype(net, config), config.model.primitives)
    run.writer.flush()
    log(f"epoch {summary['epoch']}: supernet {config.eval_on} accuracy "
        f"{summary['eval_acc']:.4f}, derived genotype "
        f"{summary['genotype_params']:.3f}M params")


def main(config, args):
    """``e2rnas search``: runs `search` on ``--workdir``."""
    def log(line):
        print(line, flush=True)

    result = search(config, args.workdir, overwrite=args.overwrite, log=log)
    if result.get("stopped"):
        log(f"e2rnas search: stopped by {result['stopped']} after step "
            f"{result['steps']}; checkpoint {result['checkpoint']} saved. "
            "Resume by running the same command again.")
        return run_lib.EXIT_CODES.get(result["stopped"], 1)
    return 0
