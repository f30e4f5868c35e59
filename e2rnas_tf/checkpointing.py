"""Run checkpoints that are complete or absent, verified and resumable.

Both runs (``e2rnas search`` and ``e2rnas train``) save their state through
`RunCheckpoint`:

- every model variable by its unique Keras path (`variables_by_path`):
  `tf.train.Checkpoint(model=model)` silently skips the layers a Keras 3
  model holds in Python lists (the cells), so a resumed run would restart
  them from their initial values;
- every optimizer variable (slots such as momentum or Adam moments, the
  iteration counter, a loss scale) by position and name
  (`optimizer_variables`);
- counters and anything else the caller passes.

A save writes ``ckpt-<step>.*`` with `tf.train.Checkpoint.write`, reads
the files back (every saved tensor, so a short or unreadable file fails
here), records their SHA-256 digests and only then lists the checkpoint in
``checkpoint_ok.json`` (written to a temporary file and renamed, which is
atomic on POSIX). A process killed at any point therefore leaves either the
previous manifest or the new one, never one naming a half-written
checkpoint. Restoring walks the manifest newest first; a checkpoint whose
files are missing, truncated or altered is skipped with a warning and the
previous good one is used.

The manifest also holds a fingerprint of the run (the caller's dict of
configuration fields that decide the variables: cells, channels,
objectives, data shape, genotype, ...) and the shape of every variable; a
checkpoint of another configuration is refused with an error naming the
difference rather than restored into the wrong variables.

Example:

>>> ckpt = RunCheckpoint(workdir + "/checkpoints",
...                      {"model": variables_by_path(model),
...                       "optimizer": optimizer_variables(optimizer),
...                       "step": step_var},
...                      fingerprint={"layers": 8, "channels": 16})
>>> ckpt.restore()       # None on a fresh run, else the restored prefix
>>> ckpt.save(step=100)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import sys

import tensorflow as tf

__all__ = ["CheckpointError", "CheckpointMismatchError", "PreemptionGuard",
           "RunCheckpoint", "optimizer_variables", "variables_by_path",
           "MANIFEST"]

MANIFEST = "checkpoint_ok.json"
_FORMAT = 1


class CheckpointError(ValueError):
    """No usable checkpoint although one is listed, or a save failed."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to a run with a different configuration."""


def variables_by_path(model):
    """Every variable of a Keras model keyed by its unique Keras path.

    `tf.train.Checkpoint(model=model)` would miss most of the network:
    Keras 3 does not expose layers held in Python lists (the cells, their
    edges) as TensorFlow checkpoint dependencies, only layers assigned to
    attributes. A flat dict of all variables is complete and does not
    depend on how the model nests its layers.

    Args:
        model: a built Keras model (or layer).

    Returns:
        ``{path: variable}`` over ``model.weights``.
    """
    variables = {}
    for v in model.weights:
        if v.path in variables:
            raise ValueError(
                f"Expected unique variable paths. Received: {v.path!r} twice")
        variables[v.path] = v
    return variables


def optimizer_variables(optimizer):
    """Every variable of a built optimizer, keyed by position and name.

    Keras optimizer paths carry an auto-numbered prefix (``sgd``,
    ``sgd_1``) that depends on how many optimizers the process created
    before, so they cannot key a checkpoint read by another process; the
    order of ``optimizer.variables`` (counters, then one slot per model
    variable in model order) is fixed by the model.

    Args:
        optimizer: a built Keras optimizer (a LossScaleOptimizer includes
            its inner optimizer's variables).

    Returns:
        ``{"0003_<name>": variable}``.
    """
    if not optimizer.built:
        raise ValueError(
            "Expected a built optimizer (call optimizer.build(variables) "
            f"first). Received: {optimizer.name!r}, not built")
    return {f"{i:04d}_{v.name}": v for i, v in enumerate(optimizer.variables)}


def _flatten(tree, prefix=""):
    """``{"a/b": variable}`` of a nested dict of variables."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif hasattr(value, "shape") and hasattr(value, "assign"):
            out[name] = value
    return out


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path, value):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _differences(old, new, prefix=""):
    """Readable ``key: old -> new`` lines for two JSON-like dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return lines


class RunCheckpoint:
    """Verified, fingerprinted checkpoints of one run's state.

    Args:
        directory: where ``ckpt-<step>.*`` and ``checkpoint_ok.json`` live.
        objects: a (nested) dict of what to save: variables, dicts of
            variables (`variables_by_path`, `optimizer_variables`) or any
            trackable TensorFlow object (e.g. a `tf.Module`).
        fingerprint: a JSON-ready dict of the configuration fields that
            decide the variables; a checkpoint saved under another
            fingerprint is refused.
        max_to_keep: how many verified checkpoints to keep (>= 1).
        log: where warnings go (a print-like callable; default stderr).
    """

    def __init__(self, directory, objects, *, fingerprint=None,
                 max_to_keep=3, log=None):
        if int(max_to_keep) < 1:
            raise ValueError(
                "Expected max_to_keep >= 1. "
                f"Received: max_to_keep={max_to_keep!r}")
        self.directory = os.fspath(directory)
        self.max_to_keep = int(max_to_keep)
        self.fingerprint = json.loads(json.dumps(fingerprint or {}))
        self._checkpoint = tf.train.Checkpoint(**objects)
        self._shapes = {name: [int(d) for d in v.shape]
                        for name, v in _flatten(objects).items()}
        self._log = log or (lambda line: print(line, file=sys.stderr,
                                               flush=True))

    # -- manifest ------------------------------------------------------------

    @property
    def manifest_path(self):
        return os.path.join(self.directory, MANIFEST)

    def _read_manifest(self):
        path = self.manifest_path
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                manifest = json.load(f)
            if manifest.get("format") != _FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}")
            return manifest
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(
                f"{path} is unreadable ({e}); move the checkpoints "
                "directory away to start afresh") from None

    def checkpoints(self):
        """The verified checkpoints, oldest first: dicts with ``prefix``
        (file name prefix in `directory`), ``step`` and ``files``."""
        manifest = self._read_manifest()
        return list(manifest["checkpoints"]) if manifest else []

    @property
    def latest(self):
        """Path prefix of the newest verified checkpoint, or None."""
        entries = self.checkpoints()
        return (os.path.join(self.directory, entries[-1]["prefix"])
                if entries else None)

    # -- saving ----------------------------------------------------------------

    def _files_of(self, prefix):
        base = os.path.basename(prefix)
        return sorted(name for name in os.listdir(self.directory)
                      if name == f"{base}.index"
                      or name.startswith(f"{base}.data-"))

    def save(self, step):
        """Writes, verifies and lists checkpoint ``ckpt-<step>``.

        Returns:
            Its path prefix.
        """
        step = int(step)
        os.makedirs(self.directory, exist_ok=True)
        manifest = self._read_manifest() or {}
        entries = [e for e in manifest.get("checkpoints", [])
                   if e["step"] != step]
        prefix = os.path.join(self.directory, f"ckpt-{step}")
        self._checkpoint.write(prefix)
        files = self._files_of(prefix)
        # Read every tensor back: a short or unreadable file fails here,
        # before the checkpoint is listed as good.
        try:
            reader = tf.train.load_checkpoint(prefix)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
        except (tf.errors.OpError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {prefix} did not read back after writing: "
                f"{str(e).splitlines()[0]}") from None
        entries.append({"prefix": os.path.basename(prefix), "step": step,
                        "files": {n: _sha256(os.path.join(self.directory, n))
                                  for n in files}})
        entries.sort(key=lambda e: e["step"])
        dropped, entries = entries[:-self.max_to_keep], \
            entries[-self.max_to_keep:]
        _write_json_atomic(self.manifest_path, {
            "format": _FORMAT, "fingerprint": self.fingerprint,
            "shapes": self._shapes, "checkpoints": entries})
        # TensorFlow's own index too (`tf.train.latest_checkpoint`, other
        # tools); restoring reads only the verified manifest.
        tf.compat.v1.train.update_checkpoint_state(
            self.directory, prefix,
            all_model_checkpoint_paths=[
                os.path.join(self.directory, e["prefix"]) for e in entries])
        # Only once the manifest no longer names them.
        for entry in dropped:
            for name in entry["files"]:
                try:
                    os.remove(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass
        return prefix

    # -- restoring -------------------------------------------------------------

    def check_compatible(self, manifest=None):
        """Raises `CheckpointMismatchError` if the directory's checkpoints
        were saved under another fingerprint or variable shapes."""
        manifest = manifest or self._read_manifest()
        if not manifest:
            return
        diffs = _differences(manifest.get("fingerprint", {}),
                             self.fingerprint)
        if diffs:
            raise CheckpointMismatchError(
                f"the checkpoints in {self.directory} belong to another "
                f"configuration ({'; '.join(diffs)}); use another --workdir "
                "or --overwrite")
        saved = manifest.get("shapes", {})
        for name in sorted(set(saved) | set(self._shapes)):
            a, b = saved.get(name), self._shapes.get(name)
            if a != b:
                raise CheckpointMismatchError(
                    f"the checkpoints in {self.directory} do not fit this "
                    f"model: variable {name} has shape "
                    f"{a if a is not None else 'absent'} there, "
                    f"{b if b is not None else 'absent'} here; use another "
                    "--workdir or --overwrite")

    def _verify(self, entry):
        """None if the files of ``entry`` are intact, else the reason."""
        for name, digest in entry["files"].items():
            path = os.path.join(self.directory, name)
            if not os.path.exists(path):
                return f"{name} is missing"
            if _sha256(path) != digest:
                return f"{name} is damaged (checksum mismatch)"
        return None

    def restore(self):
        """Restores the newest intact checkpoint.

        Returns:
            Its path prefix, or None if the directory holds no checkpoint.

        Raises:
            CheckpointMismatchError: another configuration's checkpoints.
            CheckpointError: checkpoints are listed but none is intact.
        """
        manifest = self._read_manifest()
        if not manifest or not manifest["checkpoints"]:
            return None
        self.check_compatible(manifest)
        problems = []
        for entry in reversed(manifest["checkpoints"]):
            prefix = os.path.join(self.directory, entry["prefix"])
            reason = self._verify(entry)
            if reason is None:
                try:
                    status = self._checkpoint.read(prefix)
                    status.assert_consumed()
                    return prefix
                except (tf.errors.OpError, ValueError, AssertionError) as e:
                    reason = str(e).strip().splitlines()[0]
            problems.append(f"{entry['prefix']}: {reason}")
            self._log(f"WARNING: checkpoint {prefix} is unusable ({reason}); "
                      "trying the previous one")
        raise CheckpointError(
            f"no intact checkpoint in {self.directory} "
            f"({'; '.join(problems)}); use another --workdir or --overwrite")


class PreemptionGuard:
    """Turns SIGTERM into a flag the training loop polls between steps.

    A cluster scheduler preempts a job with SIGTERM and a grace period;
    the loop finishes its current step, saves a checkpoint and returns,
    so rerunning the same command resumes. Use as a context manager; the
    previous handler is restored on exit. Outside the main thread (where
    Python cannot install signal handlers) it does nothing.

    Example:

    >>> with PreemptionGuard() as guard:
    ...     for batch in data:
    ...         step(batch)
    ...         if guard.requested:
    ...             ckpt.save(step_number)
    ...             break
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = None
        self._previous = {}

    def _handler(self, signum, frame):
        del frame
        self.requested = signal.Signals(signum).name

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


class WorkdirBusyError(ValueError):
    """Another live process is running in the same work directory."""


class WorkdirLock:
    """An exclusive lock on a work directory for the life of a run.

    Two commands writing one workdir (the same command started twice, or a
    second `e2rnas reproduce` over a running one) would interleave their
    checkpoints and truncate each other's metrics. The lock is an
    advisory `flock` on ``<workdir>/.e2rnas.lock``, which holds the owner's
    pid and is removed on release. The kernel drops the lock when the
    owner exits however it exits (SIGKILL included), so a crashed run
    leaves at most a stale file, never a stale lock.

    Example:

    >>> with WorkdirLock("runs/demo"):
    ...     pass  # the run
    """

    FILENAME = ".e2rnas.lock"

    def __init__(self, workdir):
        self.path = os.path.join(workdir, self.FILENAME)
        self._fd = None

    def _busy(self, fd):
        owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
        return WorkdirBusyError(
            f"{os.path.dirname(self.path)} is in use by another e2rnas "
            f"process (pid {owner}); wait for it to finish or use "
            "another --workdir")

    def acquire(self):
        """Takes the lock or raises `WorkdirBusyError`; returns self."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                error = self._busy(fd) if e.errno in (
                    errno.EWOULDBLOCK, errno.EACCES) else e
                os.close(fd)
                raise error from None
            # The previous owner may have removed the file between our
            # open and flock: then we hold a lock nobody else can see.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) \
                    == (mine.st_ino, mine.st_dev):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self):
        """Removes the lock file and releases the lock."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()
