"""Run checkpoints that are complete or absent, verified and resumable;
and the ``.keras`` model files a training run leaves.

Both runs (``e2rnas search`` and ``e2rnas train``) save their state through
`RunCheckpoint`:

- every model variable by its unique Keras path (`variables_by_path`):
  `tf.train.Checkpoint(model=model)` silently skips the layers a Keras 3
  model holds in Python lists (the cells), so a resumed run would restart
  them from their initial values;
- every optimizer variable (slots such as momentum or Adam moments, the
  iteration counter, a loss scale) by position and name
  (`numbered_variables`);
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
...                       "optimizer": numbered_variables(optimizer),
...                       "step": step_var},
...                      fingerprint={"layers": 8, "channels": 16})
>>> ckpt.restore()       # None on a fresh run, else the restored prefix
>>> ckpt.save(step=100)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
import zlib

import keras
import tensorflow as tf

from e2rnas_tf.runs import files as files_lib

__all__ = ["CheckpointError", "CheckpointMismatchError", "ModelFileError",
           "RunCheckpoint", "load_model_file", "numbered_variables",
           "resolve_model_file", "variables_by_path", "MANIFEST"]

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


def numbered_variables(obj):
    """Every variable of an optimiser or module, keyed by position and name.

    Keras optimizer paths carry an auto-numbered prefix (``sgd``,
    ``sgd_1``) that depends on how many optimizers the process created
    before, so names alone cannot key a checkpoint read by another process;
    the order of ``obj.variables`` (for a `tf.Module`, its attributes'
    variables in a fixed order; for a Keras optimizer, counters then one
    slot per model variable in model order) is fixed by the code.

    Args:
        obj: a `tf.Module` (e.g. `optim.MomentumSGD`) or a built Keras
            optimizer.

    Returns:
        ``{"0003_<name>": variable}``.
    """
    if getattr(obj, "built", True) is False:
        raise ValueError(
            "Expected a built optimizer (call optimizer.build(variables) "
            f"first). Received: {obj.name!r}, not built")
    return {f"{i:04d}_{v.name}": v for i, v in enumerate(obj.variables)}


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
            variables (`variables_by_path`, `numbered_variables`) or any
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
        files_lib.write_json(self.manifest_path, {
            "format": _FORMAT, "fingerprint": self.fingerprint,
            "shapes": self._shapes, "checkpoints": entries}, indent=1)
        # TensorFlow's own index too (`tf.train.latest_checkpoint`, other
        # tools), in its text format; restoring reads only the verified
        # manifest. (tf.compat.v1's writer of it is deprecated.)
        files_lib.write_text(os.path.join(self.directory, "checkpoint"), "".join(
            [f'model_checkpoint_path: "{os.path.basename(prefix)}"\n']
            + [f'all_model_checkpoint_paths: "{e["prefix"]}"\n'
               for e in entries]))
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


class ModelFileError(ValueError):
    """A ``--checkpoint`` that names no loadable ``.keras`` model."""


def resolve_model_file(checkpoint):
    """The ``.keras`` file a ``--checkpoint`` value names.

    Args:
        checkpoint: a ``.keras`` file, or a training work directory holding
            ``model_best.keras`` (preferred) or ``model_last.keras``.

    Returns:
        The path of the model file.
    """
    if not checkpoint:
        raise ModelFileError(
            "Expected --checkpoint=<train workdir or .keras file>. "
            "Received: nothing")
    if not os.path.exists(checkpoint):
        raise ModelFileError(f"Checkpoint {checkpoint} does not exist")
    if os.path.isdir(checkpoint):
        for name in ("model_best.keras", "model_last.keras"):
            path = os.path.join(checkpoint, name)
            if os.path.isfile(path):
                return path
        raise ModelFileError(
            f"{checkpoint} holds no model_best.keras or model_last.keras")
    if not checkpoint.endswith(".keras"):
        raise ModelFileError(
            f"Expected a .keras model file. Received: {checkpoint}")
    return checkpoint


def _archive_problem(path):
    """Why ``path`` is not a readable ``.keras`` zip archive, or None.

    Keras' own loader reports every one of these cases as "File not found"
    (or a bare KeyError / zip CRC error), which sends the user looking for
    a file that is right there.
    """
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            zip_magic = f.read(2) == b"PK"
        if zip_magic:
            return (f"a truncated or damaged zip archive ({size} bytes, no "
                    "zip directory at its end)")
        return (f"not a zip archive ({size} bytes; `model.save` writes "
                ".keras files as zip archives)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names:
                return ("the zip archive holds no config.json, so Keras did "
                        "not write it")
            if not names & {"model.weights.h5", "model.weights.npz"}:
                return "the zip archive holds no model.weights.h5"
            damaged = archive.testzip()
            if damaged is not None:
                return (f"{damaged} in the zip archive is damaged (CRC "
                        "mismatch)")
            try:
                json.loads(archive.read("config.json"))
            except ValueError as e:
                return f"its config.json is not valid JSON: {e}"
    except (zipfile.BadZipFile, zlib.error, OSError, RuntimeError,
            NotImplementedError) as e:
        return f"a damaged zip archive: {' '.join(str(e).split())}"
    return None


def load_model_file(path):
    """Loads a ``.keras`` file written by ``e2rnas train``.

    Args:
        path: a ``.keras`` file (see `resolve_model_file`).

    Returns:
        The Keras model (not compiled).

    Raises:
        ModelFileError: one line ``<path> is not a loadable Keras model file:
            <reason>`` for an empty, truncated, damaged or non-zip file, a
            zip without Keras' config.json or weights, and for anything
            Keras itself cannot rebuild.
    """
    # The e2rnas layers are registered with Keras' serialisation by the
    # package import (e2rnas_tf/__init__.py), which ran before this module.
    problem = _archive_problem(path)
    if problem is None:
        try:
            return keras.saving.load_model(path, compile=False)
        except (ValueError, OSError, KeyError, TypeError,
                zipfile.BadZipFile) as e:
            lines = str(e).strip().splitlines()
            problem = lines[0].strip() if lines else repr(e)
            if isinstance(e, OSError):
                # The archive was checked: h5py failing on the weights.
                problem = f"its weights file cannot be read: {problem}"
    raise ModelFileError(f"{path} is not a loadable Keras model file: {problem}")
