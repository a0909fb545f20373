"""Long steps in a log (fewshot/progress.py): a line at a steady pace with the step, done / total, rate and time
left, for extraction and training; none on a terminal, which keeps tqdm's bar. A fake clock stands for the hours."""
import contextlib
import io
import re

import pytest

from fewshot import cli, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """A fake clock: now[0] seconds; each reading of it advances it by `step[0]` seconds."""
    now, step = [0.0], [0.0]

    def read():
        now[0] += step[0]
        return now[0]
    monkeypatch.setattr(progress, "clock", read)
    return now, step


def test_a_log_gets_a_line_every_interval_and_a_last_one(clock):
    now, _ = clock
    log = io.StringIO()
    with progress.to(log), progress.bar(total=100, desc="dtd train", unit="views") as bar:
        for _ in range(100):
            now[0] += 1.0                                  # 1 view a second
            bar.update()
    lines = log.getvalue().splitlines()
    assert lines == ["dtd train: 30/100 views (30 %), 1 views/s, 1 min 10 s left",
                     "dtd train: 60/100 views (60 %), 1 views/s, 40 s left",
                     "dtd train: 90/100 views (90 %), 1 views/s, 10 s left",
                     "dtd train: 100/100 views (100 %), 1 views/s, done in 1 min 40 s"]


def test_a_short_step_a_terminal_and_a_failed_step_print_no_line(clock):
    now, _ = clock
    for stream, seconds in ((io.StringIO(), 0.1), (Terminal(), 10.0)):
        with progress.to(stream), progress.bar(total=10, desc="x", unit="runs") as bar:
            for _ in range(10):
                now[0] += seconds
                bar.update()
        assert stream.getvalue() == ""
    log = io.StringIO()
    with pytest.raises(KeyboardInterrupt), progress.to(log), progress.bar(total=10, desc="x", unit="runs") as bar:
        now[0] += 60
        bar.update()
        raise KeyboardInterrupt
    assert log.getvalue().count("\n") == 1 and "done" not in log.getvalue()   # no "done" for a step that stopped


def test_rates_and_times_read_well():
    assert [progress.rate_text(r, "runs") for r in (2.5, 0.05, 0.0002)] == ["2.5 runs/s", "3 runs/min", "0.72 runs/h"]
    assert [progress.duration(s) for s in (12, 250, 3 * 3600 + 300)] == ["12 s", "4 min 10 s", "3 h 05 min"]


def test_a_redirected_extraction_and_training_print_progress_lines(clock, make_dataset, tiny_vit_checkpoint,
                                                                 tmp_path):
    """train.py ... > log: the extraction's and the training's steps say how far they are, without a bar."""
    _, step = clock
    step[0] = 40.0                                         # every reading 40 s later: a line at each update
    log = tmp_path / "log"
    argv = ["--dataset", "dtd", "--root", str(make_dataset("dtd")), "--clip-checkpoint", str(tiny_vit_checkpoint),
            "--seeds", "1", "--max-shots", "2", "--views", "2", "--encode-batch-size", "8", "--workers", "0",
            "--device", "cpu", "--shots", "2", "--epochs", "3", "--method", "tip-f"]
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):   # not a terminal
        cli.train_command(argv)
    text = log.read_text()
    assert "\r" not in text and "%|" not in text
    when = r"(\d+ s|\d+ min \d+ s|\d+ h \d+ min)"
    shape = rf"\d+/\d+ {{unit}} \(\d+ %\), [\d.]+ {{unit}}/(s|min|h), {when} left"
    for step, unit in (("dtd train", "views"), ("training seed 1", "epochs")):   # steps of more than one update
        assert re.search(rf"^{step}: {shape.format(unit=unit)}", text, re.M), (step, text[-1500:])
    for step, unit, total in (("dtd test", "views", 7), ("dtd train", "views", 12), ("dtd val", "views", 6),
                              ("training seed 1", "epochs", 3)):
        assert re.search(rf"^{step}: {total}/{total} {unit} \(100 %\), .*, done in {when}", text, re.M), step
