"""Work directories: one identity rule for every run, and one lock.

A run (a search, a training, an evaluation, a pipeline stage) writes a
record of its identity into its work directory (``config.json``,
``evaluation.json``, ``stage.json``). `claim` decides, before anything is
written, what a directory is for a new run with a given identity:

- empty, or holding no record and none of the run's outputs: a fresh run;
- holding the same identity: this very run, which resumes (or whose result
  is reused);
- holding another identity, an unreadable record, or outputs without a
  record: refused with `WorkdirError`, naming the differences, unless
  ``overwrite`` (then the other run's outputs are deleted by `clear` once
  the new run owns the directory).

A run's identity is its resolved config without the fields that do not
change its results (`NON_IDENTITY_FIELDS`: logging, checkpoint frequency,
profiling, and the evaluation settings of a training run), plus whatever
else decides it (the genotype trained, the checkpoint evaluated).

`WorkdirLock` keeps a second process out of a directory in use.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import time

__all__ = ["Claim", "NON_IDENTITY_FIELDS", "WorkdirBusyError",
           "WorkdirError", "WorkdirLock", "claim", "clear", "differences",
           "run_identity"]

# Config fields that do not change what a run computes: a run resumes with
# them changed.
NON_IDENTITY_FIELDS = ("log_every", "checkpoint_every", "checkpoint_minutes",
                       "profile_steps", "evaluate")
# Differences named in the message (a run of another kind differs in
# dozens of fields).
_SHOWN = 4
_HINT = "pass --overwrite to replace it or choose another --workdir"


class WorkdirError(ValueError):
    """The work directory holds another run (or cannot hold one)."""


def run_identity(config_dict, **extra):
    """The identity of a run: ``config_dict`` without
    `NON_IDENTITY_FIELDS`, plus ``extra`` (JSON-ready values)."""
    identity = {k: v for k, v in config_dict.items()
                if k not in NON_IDENTITY_FIELDS}
    identity.update(extra)
    return identity


def differences(old, new, prefix=""):
    """``["key: A there, B here", ...]`` between two JSON-ready values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name}: absent there")
            elif key not in new:
                out.append(f"{name}: absent here")
            else:
                out += differences(old[key], new[key], name)
        return out
    return [] if old == new else [f"{prefix}: {old!r} there, {new!r} here"]


@dataclasses.dataclass(frozen=True)
class Claim:
    """What `claim` decided.

    Attributes:
        resume: the directory holds this very run.
        stale: outputs of another run to delete (`clear`) with
            ``overwrite``.
    """

    resume: bool
    stale: tuple = ()


def claim(workdir, identity, *, record, read, outputs=(), overwrite=False,
          what="run"):
    """Decides what ``workdir`` is for a run with ``identity``; writes
    nothing (see the module).

    Args:
        workdir: the directory (need not exist).
        identity: the new run's identity (JSON-ready; compared after a JSON
            round trip, so tuples equal lists).
        record: the file, relative to ``workdir``, holding a run's identity.
        read: ``read(path) -> identity`` of a record file; raises
            ValueError (or OSError) if it is unreadable.
        outputs: names (relative to ``workdir``) a run of this kind writes;
            any of them without a matching record is another run's.
        overwrite: accept another run's directory.
        what: the kind of run, for the message (``run``, ``evaluation``).

    Returns:
        A `Claim`.

    Raises:
        WorkdirError: no workdir, a file, or another run without
            ``overwrite``.
    """
    if not workdir:
        raise WorkdirError("Expected --workdir=DIR. Received: no workdir")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} exists and is not a "
                           "directory")
    path = os.path.join(workdir, record)
    present = tuple(name for name in dict.fromkeys((record,) + tuple(outputs))
                    if os.path.exists(os.path.join(workdir, name)))
    if not present:
        return Claim(resume=False)
    reason = None
    if not os.path.exists(path):
        reason = f"its outputs but no {record}"
    else:
        try:
            stored = read(path)
        except (OSError, ValueError) as e:
            detail = " ".join(str(e).split())
            if not overwrite:
                raise WorkdirError(
                    f"{path} exists and is not readable ({detail}); "
                    f"{_HINT}") from None
            return Claim(resume=False, stale=present)
        diffs = differences(stored, json.loads(json.dumps(identity)))
        if not diffs:
            return Claim(resume=True)
        reason = "; ".join(diffs[:_SHOWN])
        if len(diffs) > _SHOWN:
            reason += f"; and {len(diffs) - _SHOWN} more differences"
    if not overwrite:
        raise WorkdirError(
            f"{workdir} holds another {what} ({reason}); {_HINT}")
    return Claim(resume=False, stale=present)


def clear(workdir, stale):
    """Deletes another run's outputs (a `Claim`'s ``stale``)."""
    for name in stale:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


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

    def __init__(self, workdir, *, wait=0.0):
        """``wait``: seconds to wait for a busy lock before refusing (for a
        short critical section another process may be in, such as writing
        a workdir's results); 0 refuses at once."""
        self.path = os.path.join(workdir, self.FILENAME)
        self.wait = float(wait)
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
        deadline = time.monotonic() + self.wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                busy = e.errno in (errno.EWOULDBLOCK, errno.EACCES)
                if busy and time.monotonic() < deadline:
                    os.close(fd)
                    time.sleep(0.1)
                    continue
                error = self._busy(fd) if busy else e
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
        fd, self._fd = self._fd, None
        # Marked released before the file goes: once it is unlinked a
        # waiting process can take the path, and this object must not
        # still say it holds it.
        if fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()
