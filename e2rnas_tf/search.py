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
- ``checkpoints/``: verified `checkpointing.RunCheckpoint`s of every
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

import contextlib
import json
import os
import time

import numpy as np
import tensorflow as tf

from e2rnas_tf import checkpointing
from e2rnas_tf import data as data_lib
from e2rnas_tf import genotypes
from e2rnas_tf import ood as ood_lib
from e2rnas_tf import plots as plots_lib
from e2rnas_tf import resources
from e2rnas_tf import runtime
from e2rnas_tf import search_step as step_lib
from e2rnas_tf import tensorboard as tb_lib
from e2rnas_tf.search_space import SearchNetwork
from e2rnas_tf.search_space import count_params

EVAL_SPLITS = ("test", "valid")


class WorkdirError(ValueError):
    """The work directory holds a different run (or cannot be used)."""


def _config_json(config):
    return config.to_json_best_effort(sort_keys=True, indent=2) + "\n"


def check_workdir(workdir, config, overwrite=False):
    """Decides what ``workdir`` is for this run, writing nothing.

    Called before the slow set-up (data, network, tracing), so a workdir
    holding another run is refused at once; `init_workdir` writes to it
    only once the data loaded, so a config the data reject leaves the
    directory as it was and the corrected command needs no ``--overwrite``.

    Args:
        workdir: the run directory (need not exist).
        config: the resolved config.
        overwrite: accept a directory whose ``config.json`` differs (its
            files are overwritten as the new run writes them; nothing is
            deleted).

    Returns:
        True if the directory holds this very config (the run resumes).

    Raises:
        WorkdirError: no workdir, a file, or another run without
            ``overwrite``.
    """
    if not workdir:
        raise WorkdirError("Expected --workdir=DIR. Received: no workdir")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} exists and is not a directory")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        same = f.read() == _config_json(config)
    if not same and not overwrite:
        raise WorkdirError(
            f"{workdir} holds a run with a different config.json; "
            "pass --overwrite to reuse it or choose another --workdir")
    return same


def init_workdir(workdir, config):
    """Creates ``workdir`` and writes the run's ``config.json`` into it.

    The file is replaced atomically, so a kill never leaves a half-written
    config.json (which would make the next run need ``--overwrite``).
    """
    os.makedirs(os.path.join(workdir, "genotypes"), exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(_config_json(config))
    os.replace(tmp, path)


def prepare_workdir(workdir, config, overwrite=False):
    """`check_workdir` then `init_workdir`; returns whether it resumes."""
    same = check_workdir(workdir, config, overwrite)
    init_workdir(workdir, config)
    return same


def _fingerprint(config, info):
    """What decides the checkpointed variables (see `checkpointing`)."""
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

    def evaluate(split):
        correct = loss = 0.0
        n = len(split)
        for start in range(0, n, batch_size):
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


def _skip_error(metrics, objectives, limit):
    culprits = [name for name in list(objectives) + ["train"]
                if metrics.get(f"nonfinite/{name}")]
    return step_lib.SearchDivergedError(
        f"the search skipped {limit} consecutive steps with non-finite "
        f"values (objectives: {', '.join(culprits) or 'unknown'}); lower "
        "the learning rates or check the data")


def search(config, workdir, *, overwrite=False, log=print):
    """Runs an E2RNAS search and writes its results into ``workdir``.

    Args:
        config: a locked `config_lib.search_config()`-style config.
        workdir: the run directory (created if needed).
        overwrite: reuse a directory that holds a different run.
        log: where progress lines go (a print-like callable).

    Returns:
        A dict: ``genotype`` (`genotypes.Genotype`), ``genotype_params``
        (millions, at ``config.resource`` scale), ``epochs`` (per-epoch
        summaries), ``steps``, ``compile_seconds``, ``workdir``.

    Example:

    >>> from configs import search_demo
    >>> result = search(search_demo.get_config(), "runs/demo")
    >>> result["genotype"].normal[:2]

    Reference:
        https://arxiv.org/abs/2011.09820
    """
    # The run holds its workdir's lock (checkpointing.WorkdirLock) from
    # its first write until it returns or raises.
    with contextlib.ExitStack() as stack:
        return _search(config, workdir, overwrite=overwrite, log=log,
                       stack=stack)


def _search(config, workdir, *, overwrite=False, log=print, stack):
    objectives = step_lib.check_objectives(config.objectives)
    if config.eval_on not in EVAL_SPLITS:
        raise ValueError(f"Expected config.eval_on in {list(EVAL_SPLITS)}. "
                         f"Received: {config.eval_on!r}")
    # Only the chief of a multi-worker run writes the workdir; the other
    # workers follow its decisions (resume or not) and write scratch dirs.
    chief_dir = workdir
    workdir = runtime.output_dir(config, chief_dir)
    # Refuse a foreign workdir before the slow set-up, but write to it only
    # once the data loaded and the network was built (`init_workdir`
    # below), so that a config the data reject can be fixed and rerun in
    # the same workdir without --overwrite. (Pure Python: nothing here may
    # run a TensorFlow op before the multi-worker strategy exists.)
    if workdir == chief_dir:
        resume = check_workdir(workdir, config, overwrite)
    else:
        path = os.path.join(chief_dir, "config.json")
        resume = False
        if os.path.exists(path):
            with open(path) as f:
                resume = f.read() == _config_json(config)
    runtime.configure(config)
    strategy = runtime.make_strategy(config)

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
    eval_split = test if config.eval_on == "test" else a_split

    with strategy.scope():
        net = build_network(config, info)
        step = step_lib.SearchStep(
            net, config, num_classes=info.num_classes,
            image_size=info.image_size, steps_per_epoch=steps_per_epoch,
            strategy=strategy)
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
        return checkpointing.RunCheckpoint(
            os.path.join(directory, "checkpoints"),
            {"network": checkpointing.variables_by_path(net),
             "search_step": {f"{i:04d}_{v.name}": v
                             for i, v in enumerate(step.variables)},
             "epoch": epoch_var},
            fingerprint=_fingerprint(config, info), max_to_keep=3, log=log)

    # The set-up succeeded: from here on the run owns the workdir (a
    # non-chief worker: its scratch directory), and no other process may
    # write it at the same time.
    stack.enter_context(checkpointing.WorkdirLock(workdir))
    init_workdir(workdir, config)
    checkpoint = run_checkpoint(workdir)
    history_path = os.path.join(workdir, "alpha_history.npz")
    history = {"alpha_normal": [], "alpha_reduce": []}
    start_epoch, skip = 0, 0
    # A non-chief worker resumes from the chief's checkpoints.
    source = checkpoint if workdir == chief_dir else run_checkpoint(chief_dir)
    resume = resume and source.restore() is not None
    if resume:
        done = int(step.iterations.numpy())
        start_epoch, skip = divmod(done, steps_per_epoch)
        if os.path.exists(history_path):
            with np.load(history_path) as f:
                history = {k: list(f[k][:start_epoch]) for k in history}
        if start_epoch >= int(config.epochs):
            log(f"{workdir} holds a finished run of this config; "
                "re-deriving its genotype")
        else:
            log(f"resuming {workdir} at epoch {start_epoch + 1}, "
                f"step {done}")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if resume:
        # Lines written after the restored checkpoint (a run killed between
        # checkpoints) are dropped: the resumed run writes them again.
        _truncate_metrics(metrics_path, int(step.iterations.numpy()),
                          start_epoch)
    metrics_file = open(metrics_path, "a" if resume else "w")
    tb_dir = os.path.join(workdir, "tb")
    writer = tf.summary.create_file_writer(tb_dir)
    tb_lib.write_hparams(writer, config)
    profile_steps = tb_lib.parse_profile_steps(config.profile_steps)
    profiler = tb_lib.profile(tb_dir, *profile_steps) if profile_steps \
        else None

    log(f"search: {info.name} {info.image_size}x{info.image_size}, "
        f"{len(w_split)} weight / {len(a_split)} arch examples, "
        f"{config.model.layers} cells C={config.model.channels}, "
        f"batch {batch}, {steps_per_epoch} steps/epoch, "
        f"{config.epochs} epochs, objectives {list(objectives)} "
        f"({config.combine.method}, {config.arch.order} order), "
        f"{count_params(net.weight_variables):,} weights")
    limit = int(config.max_consecutive_skips)
    evaluate = make_eval_step(net, int(config.eval_batch_size))
    compile_seconds = None
    epochs_summary = []
    aug = dict(crop_padding=config.data.crop_padding, flip=config.data.flip,
               cutout=config.data.cutout)
    # SIGTERM (preemption) ends the run after the current step, saved.
    guard = checkpointing.PreemptionGuard().__enter__()
    preempted = None
    try:
        for epoch in range(start_epoch, int(config.epochs)):
            w_ds = data_lib.batches(w_split, batch, seed=config.seed,
                                    epoch=epoch, training=True,
                                    skip_batches=skip, **aug)
            # A different seed, so the two splits are not shuffled alike.
            a_ds = data_lib.batches(a_split, batch, seed=config.seed + 1,
                                    epoch=epoch, training=True,
                                    skip_batches=skip, **aug)
            o_ds = (ood_lib.batches(ood_data, batch, seed=config.seed,
                                    epoch=epoch, steps=steps_per_epoch,
                                    skip_batches=skip)
                    if ood_data is not None else None)
            if strategy.num_replicas_in_sync > 1:
                w_ds = strategy.experimental_distribute_dataset(w_ds)
                a_ds = strategy.experimental_distribute_dataset(a_ds)
                if o_ds is not None:
                    o_ds = strategy.experimental_distribute_dataset(o_ds)
            done_in_epoch = skip
            tic, since_log = time.perf_counter(), 0
            o_iter = iter(o_ds) if o_ds is not None else None
            for train_batch, valid_batch in zip(w_ds, a_ds):
                if done_in_epoch >= steps_per_epoch:
                    break
                if profiler:
                    profiler(int(step.iterations.numpy()))
                t0 = time.perf_counter()
                out = step(train_batch, valid_batch,
                           next(o_iter) if o_iter is not None else None)
                metrics = {k: float(v) for k, v in out.items()}
                since_log += 1
                if compile_seconds is None:
                    compile_seconds = time.perf_counter() - t0
                    log(f"compiled in {compile_seconds:.1f} s "
                        "(trace + first step)")
                    # The rate shown excludes the compilation.
                    tic, since_log = time.perf_counter(), 0
                done_in_epoch += 1
                global_step = int(step.iterations.numpy())
                record = {"kind": "step", "step": global_step,
                          "epoch": epoch + 1, **metrics}
                metrics_file.write(json.dumps(record) + "\n")
                arch = _architecture_scalars(net, config)
                with writer.as_default(step=global_step):
                    for key, value in {**metrics, **arch}.items():
                        tf.summary.scalar(key, value)
                if metrics["skipped"]:
                    culprits = [n for n in list(objectives) + ["train"]
                                if metrics[f"nonfinite/{n}"]]
                    log(f"step {global_step} skipped: non-finite "
                        f"{', '.join(culprits) or 'update'} "
                        f"({int(metrics['consecutive_skips'])} in a row)")
                if metrics["consecutive_skips"] >= limit:
                    # Skipped steps change nothing: this checkpoint holds
                    # the last finite state.
                    checkpoint.save(global_step)
                    log(f"last finite state saved in {checkpoint.latest}")
                    raise _skip_error(metrics, objectives, limit)
                if (done_in_epoch % max(int(config.log_every), 1) == 0
                        or done_in_epoch == steps_per_epoch):
                    rate = (time.perf_counter() - tic) / max(since_log, 1)
                    tic, since_log = time.perf_counter(), 0
                    log(_progress_line(epoch, config.epochs, done_in_epoch,
                                       steps_per_epoch, metrics, objectives,
                                       rate))
                if (config.checkpoint_every
                        and global_step % int(config.checkpoint_every) == 0):
                    checkpoint.save(global_step)
                if guard.requested:
                    break
            if guard.requested and done_in_epoch < steps_per_epoch:
                # Preempted mid-epoch: save the finished steps; the same
                # command resumes from them. (At the end of an epoch the
                # epoch is completed first.)
                checkpoint.save(int(step.iterations.numpy()))
                preempted = guard.requested
                break
            skip = 0
            summary = _end_of_epoch(
                epoch, net, config, params_table, evaluate, eval_split,
                workdir, history, history_path)
            epochs_summary.append(summary)
            metrics_file.write(json.dumps(summary) + "\n")
            metrics_file.flush()
            with writer.as_default(step=int(step.iterations.numpy())):
                tf.summary.scalar("epoch/eval_acc", summary["eval_acc"])
                tf.summary.scalar("epoch/eval_loss", summary["eval_loss"])
                tf.summary.scalar("epoch/genotype_params",
                                  summary["genotype_params"])
            tb_lib.write_search_epoch_summaries(
                writer, int(step.iterations.numpy()),
                *[w.numpy() for w in net.op_weights()],
                derive_genotype(net, config), config.model.primitives)
            writer.flush()
            log(f"epoch {epoch + 1}: supernet {config.eval_on} accuracy "
                f"{summary['eval_acc']:.4f}, derived genotype "
                f"{summary['genotype_params']:.3f}M params")
            epoch_var.assign(epoch + 1)
            checkpoint.save(int(step.iterations.numpy()))
            if guard.requested and epoch + 1 < int(config.epochs):
                preempted = guard.requested
                break
    finally:
        if profiler:
            profiler.stop()
        guard.__exit__()
        metrics_file.close()
        writer.close()
    if preempted:
        return dict(preempted=preempted, steps=int(step.iterations.numpy()),
                    checkpoint=checkpoint.latest, workdir=workdir)

    genotype = derive_genotype(net, config)
    genotype.save(os.path.join(workdir, "genotype.json"))
    params = genotype_params(genotype, params_table, config.model.primitives)
    log(f"genotype: {genotype.to_json()}")
    log(f"expected parameters: {params:.3f}M (derived network, "
        f"{config.resource.layers} cells, C={config.resource.channels})")
    plots_lib.plot_run(workdir, os.path.join(workdir, "plots"))
    log(f"results in {workdir}: genotype.json, metrics.jsonl, "
        "alpha_history.npz, plots/, checkpoints/, tb/")
    return dict(genotype=genotype, genotype_params=params,
                epochs=epochs_summary, steps=int(step.iterations.numpy()),
                compile_seconds=compile_seconds, workdir=workdir)


def _truncate_metrics(path, last_step, last_epoch):
    """Keeps the metric lines up to a checkpoint, rewritten atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("kind") == "step" and record["step"] <= last_step:
                kept.append(line)
            elif record.get("kind") == "epoch" \
                    and record["epoch"] <= last_epoch:
                kept.append(line)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(line if line.endswith("\n") else line + "\n"
                     for line in kept)
    os.replace(tmp, path)


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


def _end_of_epoch(epoch, net, config, params_table, evaluate, eval_split,
                  workdir, history, history_path):
    genotype = derive_genotype(net, config)
    genotype.save(os.path.join(workdir, "genotypes",
                               f"epoch_{epoch + 1:03d}.json"))
    history["alpha_normal"].append(net.alpha_normal.numpy())
    history["alpha_reduce"].append(net.alpha_reduce.numpy())
    np.savez(history_path, **{k: np.stack(v) for k, v in history.items()})
    eval_acc, eval_loss = evaluate(eval_split)
    return {"kind": "epoch", "epoch": epoch + 1, "eval_on": config.eval_on,
            "eval_acc": eval_acc, "eval_loss": eval_loss,
            "genotype_params": genotype_params(genotype, params_table,
                                               config.model.primitives),
            "genotype": genotype.to_dict()}


def main(config, args):
    """``e2rnas search``: runs `search` on ``--workdir``."""
    from absl import logging as absl_logging

    # Checkpoint saving logs at INFO through absl; keep the run log readable.
    absl_logging.set_verbosity(absl_logging.WARNING)

    def log(line):
        print(line, flush=True)

    result = search(config, args.workdir, overwrite=args.overwrite, log=log)
    if result.get("preempted"):
        log(f"e2rnas search: stopped by {result['preempted']} after step "
            f"{result['steps']}; checkpoint {result['checkpoint']} saved. "
            "Resume by running the same command again.")
    return 0
