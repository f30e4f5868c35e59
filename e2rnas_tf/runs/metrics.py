"""``metrics.jsonl``: one JSON object per line, appended as a run goes.

A resumed run first cuts the file back to what its checkpoint covers
(lines written after the checkpoint are written again by the resumed run),
atomically, so a kill during the cut loses nothing.
"""

from __future__ import annotations

import json
import os

from e2rnas_tf.runs import files

__all__ = ["MetricsLog", "read"]


def read(path):
    """The records of a metrics file (a line cut short by a kill is
    skipped); [] if it does not exist."""
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return records


class MetricsLog:
    """Appends records to a ``metrics.jsonl``.

    Args:
        path: the file.
        keep: on resume, a predicate ``keep(record) -> bool`` choosing the
            lines to keep; None starts a new file.

    Example:

    >>> log = MetricsLog("run/metrics.jsonl",
    ...                  keep=lambda r: r["step"] <= restored_step)
    >>> log.write({"kind": "step", "step": 1, "loss": 2.3})
    >>> log.close()
    """

    def __init__(self, path, keep=None):
        self.path = os.fspath(path)
        if keep is None:
            files.write_text(self.path, "")
        elif os.path.exists(self.path):
            kept = [r for r in read(self.path) if keep(r)]
            files.write_text(self.path, "".join(
                json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")

    def write(self, record):
        """Appends one record and flushes it."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()
