"""Atomic, durable file writes: a reader sees the old file or the new one.

Every write goes to a temporary file in the same directory, is flushed and
fsynced, renamed over the target (atomic on POSIX) and the directory is
fsynced, so neither a kill nor a power loss leaves a half-written
``config.json``, report or model behind.
"""

from __future__ import annotations

import json
import os
import re

__all__ = ["read_json", "remove_temporaries", "save_keras", "write_bytes",
           "write_json", "write_text"]


def _fsync_dir(directory):
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path):
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def write_text(path, text):
    """Writes ``text`` to ``path`` atomically (see the module)."""
    write_bytes(path, text.encode())


def write_bytes(path, data):
    """Writes ``data`` (bytes) to ``path`` atomically (see the module)."""
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(path))


def write_json(path, value, *, indent=2, sort_keys=True):
    """Writes ``value`` as JSON (with a final newline) atomically."""
    write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys)
               + "\n")


def read_json(path, default=None):
    """The JSON value in ``path``, or ``default`` if it does not exist.

    Raises:
        ValueError: the file exists but is not valid JSON (a
            `json.JSONDecodeError`).
    """
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def save_keras(model, path):
    """``model.save(path)`` atomically (Keras wants the ``.keras`` suffix,
    so the temporary file keeps it)."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
    try:
        model.save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


# The temporary names of this module (``.NAME.tmp-PID``, ``.tmp-PID-NAME``)
# and of `Genotype.save` (``NAME.tmp-PID``).
_TEMPORARY = re.compile(r"^(\.tmp-(?P<a>\d+)-.+|.+\.tmp-(?P<b>\d+))$")


def remove_temporaries(directory, skip=()):
    """Removes the temporary files that writers killed mid-write left below
    ``directory`` (not below its subdirectories named in ``skip``); call it
    only while holding the directory's lock. Returns the removed paths."""
    removed = []
    for root, dirs, names in os.walk(directory):
        if root == directory:
            dirs[:] = [d for d in dirs if d not in skip]
        for name in names:
            match = _TEMPORARY.match(name)
            if match and int(match["a"] or match["b"]) != os.getpid():
                path = os.path.join(root, name)
                os.remove(path)
                removed.append(path)
    return removed
