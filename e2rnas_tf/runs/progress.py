"""`Progress`: how far a run is and when it will end.

On a terminal a Keras progress bar per epoch (or evaluation); piped into a
file or a pipeline's log, a line every few steps. Both say the fraction of
the whole run done and its estimated time to finish, from the rate of the
steps measured since the first one (which includes compiling and is left
out).

Example:

>>> progress = Progress(total=600, done=120, log=print)
>>> progress.begin(200, "epoch 2/3")
>>> for n in range(1, 201):
...     ...  # one step
...     progress.update(n, [("loss", 1.2)], line=lambda: f"step {n}")
"""

from __future__ import annotations

import math
import sys
import time

import keras

__all__ = ["Progress", "format_duration"]


def format_duration(seconds):
    """``seconds`` as ``"1:02:03"`` / ``"2:03"``; ``"?"`` when unknown."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


class Progress:
    """Progress and ETA over ``total`` units of work (steps, examples).

    Args:
        total: units in the whole run.
        done: units already done (a resumed run).
        log: where lines go when not interactive (print-like).
        every: units between lines when not interactive.
        interactive: draw a progress bar; default: stdout is a terminal.
    """

    def __init__(self, total, done=0, *, log=print, every=10,
                 interactive=None):
        self.total = max(int(total), 1)
        self.done = int(done)
        self.log = log
        self.every = max(int(every), 1)
        self.interactive = (sys.stdout.isatty() if interactive is None
                            else bool(interactive))
        self._bar = None
        self._clock = None     # (time, units done) when timing started
        self.part_units = self._part_done = 0

    def begin(self, units, title=None, done=0):
        """Starts a part (an epoch, an evaluation) of ``units`` units,
        ``done`` of them already (a resumed epoch)."""
        self.part_units, self._part_done = int(units), int(done)
        if title:
            self.log(title)
        self._bar = (keras.utils.Progbar(int(units), verbose=1,
                                         unit_name="step")
                     if self.interactive else None)

    def rate(self):
        """Seconds per unit since timing started; None before two
        measurements."""
        if self._clock is None:
            return None
        start, units = self._clock
        if self.done <= units:
            return None
        return (time.perf_counter() - start) / (self.done - units)

    def eta(self):
        """Seconds left, estimated; None while unknown."""
        rate = self.rate()
        return None if rate is None else rate * (self.total - self.done)

    def summary(self):
        """``"45% ETA 12:34"``: the whole run's fraction done and time left."""
        percent = 100.0 * min(self.done, self.total) / self.total
        return f"{percent:.0f}% ETA {format_duration(self.eta())}"

    def update(self, part_done, values=(), line=None):
        """Records progress: ``part_done`` units of the current part.

        Args:
            part_done: units of the part done so far.
            values: ``[(name, number)]`` shown on the bar.
            line: a function returning the line to log (not interactive)
                every `every` units and at the part's end; the fraction and
                ETA are appended.
        """
        self.done += int(part_done) - self._part_done
        self._part_done = int(part_done)
        if self._clock is None:
            # The first unit includes compiling: time from its end.
            self._clock = (time.perf_counter(), self.done)
        if self._bar is not None:
            self._bar.update(int(part_done), list(values))
            return
        if line is not None and (part_done % self.every == 0
                                 or part_done == self.part_units):
            self.log(f"{line()} | {self.summary()}")
