"""A quiet TensorFlow start-up: the package import and the CLI's devices.

Importing TensorFlow 2.21 writes native log lines to stderr: the oneDNN
notice, the CUDA probing (``cudart_stub.cc``) and the CPU-feature notice,
each block preceded by ``WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR`` (the native
libraries log through absl before anything initialises absl logging, and
absl then writes every message, whatever ``TF_CPP_MIN_LOG_LEVEL`` says);
the first device query then logs, without a GPU driver, ``failed call to
cuInit`` (an ERROR). On a user error they preceded the one line
``e2rnas <cmd>: error: ...``.

Neither function changes the process's environment. Both redirect file
descriptor 2 to a temporary file around the call, then write back what was
printed except the absl banner and the absl records below a level (any
other output, e.g. a Python warning, still shows; if the call fails,
everything shows):

- `import_tensorflow_quietly`, called by ``import e2rnas_tf`` (the package
  imports TensorFlow anyway, to register its Keras layers): the level is
  ``TF_CPP_MIN_LOG_LEVEL`` when the user set it, else 1 (INFO records
  hidden, warnings and errors shown);
- `initialize_devices_quietly`, called by the console entry point
  (`cli.run`, also what ``python -m e2rnas_tf`` runs) before it parses
  flags: the level is ``TF_CPP_MIN_LOG_LEVEL`` when set, else 3 (the CUDA
  probe's ERROR on a machine without a GPU is not the user's error).

``TF_CPP_MIN_LOG_LEVEL=0 e2rnas ...`` shows everything.
"""

import contextlib
import os
import re
import sys
import tempfile

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# Hidden below these levels unless the user set TF_CPP_MIN_LOG_LEVEL.
IMPORT_LEVEL = 1
CLI_LEVEL = 3
ABSL_BANNER = ("WARNING: All log messages before absl::InitializeLog() is "
               "called are written to STDERR")
# An absl/glog record: severity letter, MMDD, time, thread id, file:line].
# (TF 2.21 prints "I0000 00:00:1796100230.297574": seconds since 1970.)
_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")
_SEVERITIES = "IWEF"
# A Python warning ("path.py:12: DeprecationWarning: ..."): never taken
# for the continuation of a record.
_PY_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")


def _level(default):
    value = os.environ.get(LEVEL_VARIABLE)
    return default if value is None else min_level(value)


def import_tensorflow_quietly():
    """Imports TensorFlow without its start-up log lines (see the module).

    Does nothing if TensorFlow is already imported.
    """
    if "tensorflow" in sys.modules:
        return
    level = _level(IMPORT_LEVEL)
    if level == 0:
        import tensorflow  # noqa: F401
        return
    with _stderr_captured() as captured:
        import tensorflow  # noqa: F401
    _replay(captured[0], level)


def initialize_devices_quietly():
    """Lists TensorFlow's devices (which probes CUDA) without the probe's
    log lines (see the module). For the process's entry point."""
    import tensorflow as tf

    level = _level(CLI_LEVEL)
    if level == 0:
        tf.config.list_physical_devices()
        return
    with _stderr_captured() as captured:
        tf.config.list_physical_devices()
    _replay(captured[0], level)


def _replay(text, level):
    sys.stderr.write(drop_startup_lines(text, level))
    sys.stderr.flush()


def min_level(value):
    """`TF_CPP_MIN_LOG_LEVEL` as TensorFlow reads it: 0 (all) .. 3."""
    try:
        return max(0, min(3, int(value)))
    except ValueError:
        return 0


def drop_startup_lines(text, level):
    r"""`text` without the absl banner and absl records below `level`.

    Every other line is kept (e.g. a Python warning printed during the
    import), except the continuation lines of a dropped multi-line record
    (the CPU-feature notice has one).

    Args:
        text: What was written to stderr.
        level: 0 = keep everything; 1 = drop INFO records; 2 = also
            WARNING; 3 = also ERROR (FATAL is always kept).

    Returns:
        The remaining lines.

    Example:

    >>> drop_startup_lines("I0000 00:00:1.5 7 port.cc:153] oneDNN\n"
    ...                    "other output\n", 3)
    'other output\n'
    """
    if level <= 0:
        return text
    kept = []
    dropping = False  # inside a dropped record (its continuation lines)
    for line in text.splitlines(keepends=True):
        record = _RECORD.match(line)
        if record:
            dropping = _SEVERITIES.index(record.group(1)) < level
        elif line.rstrip("\n") == ABSL_BANNER:
            dropping = False
            continue
        elif _PY_WARNING.match(line):
            dropping = False
        if not dropping:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _stderr_captured():
    """Redirects file descriptor 2 (native and Python writes alike) to a
    temporary file, and restores it on exit, also after an exception.
    Yields a list that holds the captured text on exit; after an exception
    the captured text is written back in full before it propagates."""
    captured = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        failed = True
        try:
            yield captured
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            captured.append(file.read().decode("utf-8", "replace"))
            if failed:
                sys.stderr.write(captured[0])
                sys.stderr.flush()
