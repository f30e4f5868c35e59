"""`Run`: the context a search or a training run lives in.

What both loops need and used to solve each in its own way:

- the work directory's lock (`workdir.WorkdirLock`), held from the first
  write to the end;
- a stop request: SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C)
  ends the run at the next step boundary, checkpointed; a second SIGINT
  interrupts at once;
- when to checkpoint: every ``config.checkpoint_every`` steps and every
  ``config.checkpoint_minutes`` of wall-clock time (so a hard kill loses
  at most those minutes);
- under ``multi_worker``, one decision for all workers: a signal or a
  checkpoint time on any worker stops or saves every worker at the same
  step (the flags are all-reduced after each step), so no worker is left
  waiting in a collective for a peer that has gone;
- ``metrics.jsonl`` (`metrics.MetricsLog`), cut back to the checkpoint on
  resume;
- TensorBoard: the writer, the config as hparams, and the profiler over
  ``config.profile_steps``, each traced step marked with its number
  (without the markers the Profile tab reports "no step marker observed";
  with them its Input Pipeline Analysis lists every step's time, and so
  does the Overview page for runs with ``jit_compile``);
- the limit on consecutive skipped steps (non-finite values);
- the temporary files of a killed predecessor, removed when the run opens
  its outputs (`files.remove_temporaries`);
- a non-chief worker's scratch directory, removed at the end.

Example:

>>> with Run(workdir, config, scratch=not chief) as run:
...     workdir_lib.clear(workdir, claim.stale)   # the run owns it now
...     resume = checkpoint.restore() is not None
...     run.open(keep=(lambda r: r["step"] <= step) if resume else None)
...     for step, batch in ...:
...         with run.trace(step):
...             out = train_step(batch)
...         run.metrics.write(out)
...         if run.count_skip(out["skipped"]) >= run.skip_limit: ...
...         save, stop = run.poll(step)
...         if save: checkpoint.save(step)
...         if stop: break
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time

import tensorflow as tf

from e2rnas_tf import tensorboard as tb_lib
from e2rnas_tf.runs import files
from e2rnas_tf.runs import metrics as metrics_lib
from e2rnas_tf.runs import workdir as workdir_lib

__all__ = ["PreemptionGuard", "Run", "EXIT_CODES"]

# The exit code of a command its run stopped for a signal: 0 after SIGTERM
# (a preemption the scheduler asked for), 130 after Ctrl-C (128 + SIGINT,
# the shell's convention for an interrupted command).
EXIT_CODES = {"SIGTERM": 0, "SIGINT": 130}


class PreemptionGuard:
    """Turns SIGTERM and SIGINT into a flag a loop polls between steps.

    A cluster scheduler preempts a job with SIGTERM and a grace period; a
    user stops one with Ctrl-C. The loop finishes its current step, saves
    a checkpoint and returns, so rerunning the same command resumes. A
    second SIGINT raises KeyboardInterrupt at once (the usual "press again
    to force"). Use as a context manager; the previous handlers are
    restored on exit. Outside the main thread (where Python cannot install
    signal handlers) it does nothing.

    Attributes:
        requested: None, or the name of the first signal received.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = None
        self._previous = {}

    def _handler(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.requested == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = self.requested or name

    def __enter__(self):
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False


class Run:
    """The context of one run writing ``workdir`` (see the module).

    Args:
        workdir: where the run writes (a non-chief worker: its scratch
            directory).
        config: the run's config (``profile_steps``,
            ``max_consecutive_skips``, ``checkpoint_every``,
            ``checkpoint_minutes``; recorded as TensorBoard hparams).
        scratch: ``workdir`` is a non-chief worker's scratch directory,
            deleted when the run ends.
        strategy: the run's `tf.distribute.Strategy`; under
            `tf.distribute.MultiWorkerMirroredStrategy` the workers agree
            on every `poll`.
        log: where the run's notices go (print-like).

    Attributes (after `open`):
        metrics: the `metrics.MetricsLog` of ``metrics.jsonl``.
        writer: the TensorBoard writer of ``tb/``.
        skip_limit: ``config.max_consecutive_skips``.
    """

    def __init__(self, workdir, config, *, scratch=False, strategy=None,
                 log=print):
        self.workdir = os.fspath(workdir)
        self.config = config
        self.scratch = bool(scratch)
        self.log = log
        self.skip_limit = int(config.max_consecutive_skips)
        self._every = int(config.get("checkpoint_every", 0) or 0)
        self._seconds = 60.0 * float(config.get("checkpoint_minutes", 0) or 0)
        self._last_save = time.monotonic()
        self._agree = _agreement(strategy)
        self._peer_stop = None
        self.metrics = None
        self.writer = None
        self._profiler = None
        self._skips = 0
        self._stack = None
        self._guard = PreemptionGuard()

    # -- lifetime --------------------------------------------------------------

    def __enter__(self):
        stack = contextlib.ExitStack()
        try:
            if self.scratch:
                stack.callback(shutil.rmtree, self.workdir, True)
            stack.enter_context(workdir_lib.WorkdirLock(self.workdir))
            stack.enter_context(self._guard)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def open(self, keep=None):
        """Opens the outputs, once the run owns the directory.

        Args:
            keep: resuming: ``keep(record)`` chooses the metric lines the
                checkpoint covers; None starts a new ``metrics.jsonl``.
        """
        stack = self._stack
        # What a killed predecessor was writing when it died.
        files.remove_temporaries(self.workdir, skip=("checkpoints", "tb"))
        self.metrics = metrics_lib.MetricsLog(
            os.path.join(self.workdir, "metrics.jsonl"), keep=keep)
        stack.callback(self.metrics.close)
        tb_dir = os.path.join(self.workdir, "tb")
        self.writer = tf.summary.create_file_writer(tb_dir)
        stack.callback(self.writer.close)
        tb_lib.write_hparams(self.writer, self.config)
        steps = tb_lib.parse_profile_steps(self.config.profile_steps)
        if steps:
            self._profiler = tb_lib.profile(tb_dir, *steps)
            self.log(
                f"profiling steps {steps[0]}-{steps[1] - 1}: the trace goes "
                f"to {os.path.join(tb_dir, 'plugins', 'profile')}; view it "
                f"with `pip install xprof && tensorboard --logdir {tb_dir}`, "
                "PROFILE tab (step times: Input Pipeline Analysis)")
            # A run that stops early still closes its trace.
            stack.callback(self._profiler.stop)
        return self

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        return False

    # -- during the run --------------------------------------------------------

    def trace(self, step):
        """A context around one step: starts/stops the profiler at the
        configured steps and, while it records, marks the step."""
        if self._profiler is None:
            return contextlib.nullcontext()
        self._profiler(step)
        if not self._profiler.active:
            return contextlib.nullcontext()
        return tf.profiler.experimental.Trace("step", step_num=int(step),
                                              _r=1)

    def scalars(self, step, values, prefix=""):
        """Writes ``{name: number}`` to TensorBoard at ``step``."""
        with self.writer.as_default(step=int(step)):
            for name, value in values.items():
                tf.summary.scalar(prefix + name, value)

    def poll(self, step=None):
        """After ``step`` steps (None: between steps that count, e.g. in
        an evaluation): ``(save, stop)``.

        ``save``: a checkpoint is due (``step`` is a multiple of
        ``checkpoint_every``, or ``checkpoint_minutes`` passed since the
        last one; the caller saves and the clock restarts). ``stop``: a
        signal asked the run to stop (on any worker). Every worker of a
        multi-worker run must call it after every step: they all-reduce
        their flags and get the same answer.
        """
        save = step is not None and (
            bool(self._every and step % self._every == 0)
            or bool(self._seconds and time.monotonic() - self._last_save
                    >= self._seconds))
        requested = self._guard.requested
        flags = [save, requested == "SIGTERM", requested == "SIGINT"]
        if self._agree is not None:
            flags = self._agree(flags)
            if requested is None and (flags[1] or flags[2]):
                self._peer_stop = "SIGINT" if flags[2] else "SIGTERM"
                self.log(f"another worker received {self._peer_stop}: "
                         "stopping with it")
        if flags[0]:
            self.saved()
        return bool(flags[0]), bool(flags[1] or flags[2])

    def saved(self):
        """Restarts the checkpoint clock (a checkpoint was just written)."""
        self._last_save = time.monotonic()

    def count_skip(self, skipped):
        """Counts consecutive skipped steps; returns the current count."""
        self._skips = self._skips + 1 if skipped else 0
        return self._skips

    @property
    def stop_requested(self):
        """None, or the signal (``"SIGTERM"``, ``"SIGINT"``) that asked
        the run to stop (this worker's, or, once `poll` learnt it, a
        peer's)."""
        return self._guard.requested or self._peer_stop


def _agreement(strategy):
    """A function combining every worker's flags (any worker's True is
    everyone's), or None when there is a single worker process."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None

    @tf.function(autograph=False)
    def reduce(flags):
        per_replica = strategy.run(tf.identity, args=(flags,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                               axis=None)

    def agree(flags):
        summed = reduce(tf.constant([float(f) for f in flags], tf.float32))
        return [bool(v > 0) for v in summed.numpy()]

    return agree
