"""A quiet TensorFlow start-up for the ``e2rnas`` command line.

Importing TensorFlow 2.21 writes native log lines to stderr: the oneDNN
notice and the CUDA probing (``cudart_stub.cc``), each block preceded by
``WARNING: All log messages before absl::InitializeLog() is called are
written to STDERR`` (the native libraries log through absl before anything
initialises absl logging, and absl then writes every message, whatever
``TF_CPP_MIN_LOG_LEVEL`` says); later the first op logs the CPU-feature
notice and, without a GPU driver, ``failed call to cuInit`` (these two do
obey ``TF_CPP_MIN_LOG_LEVEL``). On a user error they preceded the one line
``e2rnas <cmd>: error: ...``.

`import_tensorflow_quietly` is called once by the console entry point
(`cli.run`, also what ``python -m e2rnas_tf`` runs), before anything
imports TensorFlow (loading a ``--config`` file does), except for the usage
message, which needs no TensorFlow:

- it sets ``TF_CPP_MIN_LOG_LEVEL=3`` unless the user set it (3 is what
  hides the cuInit line, an ERROR; TensorFlow's failures still reach the
  user as Python exceptions);
- it imports TensorFlow with file descriptor 2 redirected to a temporary
  file, then writes back to stderr what the import printed except absl
  records below that level and the absl banner (so
  ``TF_CPP_MIN_LOG_LEVEL=0 e2rnas ...`` shows everything, and any other
  output of the import, e.g. a Python warning, still shows; if the import
  fails, all of it shows).

It is not called on import of the package: a library never changes the
process's environment.
"""

import contextlib
import os
import re
import sys
import tempfile

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = "3"
ABSL_BANNER = ("WARNING: All log messages before absl::InitializeLog() is "
               "called are written to STDERR")
# An absl/glog record: severity letter, MMDD, time, thread id, file:line].
# (TF 2.21 prints "I0000 00:00:1796100230.297574": seconds since 1970.)
_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")
_SEVERITIES = "IWEF"


def import_tensorflow_quietly():
    """Imports TensorFlow without its start-up log lines (see the module).

    For the process's entry point only: it sets `TF_CPP_MIN_LOG_LEVEL` in
    `os.environ` (unless set) for the rest of the process. Does nothing if
    TensorFlow is already imported.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault(LEVEL_VARIABLE, DEFAULT_LEVEL)
    level = min_level(os.environ[LEVEL_VARIABLE])
    if level == 0:
        import tensorflow  # noqa: F401
        return
    with _stderr_captured() as captured:
        import tensorflow  # noqa: F401
    sys.stderr.write(drop_startup_lines(captured[0], level))
    sys.stderr.flush()


def min_level(value):
    """`TF_CPP_MIN_LOG_LEVEL` as TensorFlow reads it: 0 (all) .. 3."""
    try:
        return max(0, min(3, int(value)))
    except ValueError:
        return 0


def drop_startup_lines(text, level):
    r"""`text` without the absl banner and absl records below `level`.

    Every other line is kept (a Python warning printed during the import,
    or the continuation line of a multi-line record).

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
    for line in text.splitlines(keepends=True):
        record = _RECORD.match(line)
        if record and _SEVERITIES.index(record.group(1)) < level:
            continue
        if line.rstrip("\n") == ABSL_BANNER:
            continue
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
