"""Progress of a long step that a person can follow: tqdm's bar on a terminal, and where the output is a log (a
file, a pipe, a cluster's job log), a line at a steady pace that says the step, done / total, the rate and the
time left:

    dtd train: 1200/16940 views (7 %), 2.4 views/s, 1 h 49 min left

    with progress.bar(total=len(items), desc="dtd test", unit="views") as bar:   # as tqdm(...)
        for ...: bar.update(n)

The bar goes to stderr when stderr is a terminal (tqdm's disable=None); the lines go to stdout when stdout is not
one, every INTERVAL seconds of the step (the first one INTERVAL seconds in, so a short step prints none), and a
last one when a step that took longer ends. to(stream) sends the lines elsewhere (the sweep keeps its runs'
printed tables back, and passes their progress through to its own log).
"""
import contextlib
import sys
import time

from tqdm import tqdm

INTERVAL = 30.0          # seconds between two progress lines of a step in a log
clock = time.monotonic   # what the pace is measured with (a test gives a fake one)
_stream = None           # where the lines go; None: sys.stdout at the time of the line


@contextlib.contextmanager
def to(stream):
    """Progress lines go to `stream` inside the block (instead of sys.stdout)."""
    global _stream
    before, _stream = _stream, stream
    try:
        yield
    finally:
        _stream = before


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def duration(seconds: float) -> str:
    """3 h 05 min, 4 min 10 s, 12 s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def rate_text(rate: float, unit: str) -> str:
    """A rate in the unit of time that shows it best: 2.4 views/s, 3.5 runs/min, 0.8 runs/h."""
    for per, scale in (("s", 1), ("min", 60), ("h", 3600)):
        if rate * scale >= 1 or per == "h":
            return f"{rate * scale:.3g} {unit}/{per}"


class Bar:
    """tqdm's bar (on a terminal) and the log's progress lines, updated together; tqdm's update, set_postfix and
    close, and a context manager."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, **tqdm_args):
        self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=None, **tqdm_args)
        self.total, self.desc, self.unit, self.initial, self.done = total, desc, unit, initial, initial
        self.stream = _stream if _stream is not None else sys.stdout
        self.lines = not _is_terminal(self.stream)
        self.start = self.last = clock()
        self.printed, self.postfix = 0, ""

    def update(self, n: int = 1):
        self.bar.update(n)
        self.done += n
        if self.lines and self.done < self.total and clock() - self.last >= INTERVAL:
            self._line()  # (the last one is close()'s)

    def set_postfix(self, **values):
        self.bar.set_postfix(**values)
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _line(self, final=False):
        now = clock()
        elapsed, done = now - self.start, self.done - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        if final:
            when = f"done in {duration(elapsed)}"
        elif rate > 0 and self.total:
            when = f"{duration((self.total - self.done) / rate)} left"
        else:
            when = "time left unknown"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}, {rate_text(rate, self.unit)}, {when}{extra}",
              file=self.stream, flush=True)
        self.last, self.printed = now, self.printed + 1

    def close(self):
        if self.lines and (self.printed or clock() - self.start >= INTERVAL):  # a long step says that it ended
            self._line(final=True)
        self.printed, self.lines = 0, False
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, failed, *exc):
        if failed:  # a step stopped by an error did not end: no last line
            self.lines = False
        self.close()


def bar(total: int, desc: str, unit: str, initial: int = 0, **tqdm_args) -> Bar:
    """A progress bar of `total` steps in `unit`, shown as the module says; tqdm_args go to tqdm (leave, ...)."""
    return Bar(total, desc, unit, initial, **tqdm_args)
