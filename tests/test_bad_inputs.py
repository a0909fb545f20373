"""The registry of bad inputs (fewshot/testing/bad_inputs.py), run in this process through the commands' own
entry points: every case of every family gets exactly one error line naming only flags of its command and
saying what the case expects, a non-zero exit, an end in time and no file lost; the controls succeed and pass
their checks. bench/bad_inputs.py runs the same cases as real commands for docs/bad-inputs.md. Also the judging
itself, on made-up output."""
import pytest

from fewshot.testing import bad_inputs as b


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """The inputs every case copies and breaks: built once, on first use."""
    return b.Fixtures(tmp_path_factory.mktemp("shared"))


@pytest.mark.parametrize("name", list(b.CASES))
def test_a_bad_input_gets_one_error_line_and_loses_nothing(name, fixtures, tmp_path):
    if b.CASES[name].applies and not b.CASES[name].applies():
        pytest.skip("not a bad input on this machine")
    outcome = b.prepare(name, b.CASES[name], tmp_path / name, fixtures)
    before = b.snapshot(outcome.folder, fixtures.dir)
    b.run_in_process(outcome, before, fixtures)
    assert not outcome.problems, (outcome.problems, outcome.errors, outcome.others[:3], outcome.stdout[-500:])


def test_every_family_has_cases_and_every_case_a_family():
    assert all(b.FAMILIES.values()) and {c.family for c in b.CASES.values()} == set(b.FAMILIES)
    assert sum(map(len, b.FAMILIES.values())) == len(b.CASES)          # no name in two families


def test_judging_sees_what_a_terminal_shows_and_every_lost_file(tmp_path):
    # a progress bar redrawn after "\r" and cleared when closed shows nothing; one left behind is a line
    assert b.shown_lines("\r 0%|  | 0/3\r   \r\nerror: x\n") == ["error: x"]
    assert b.shown_lines("\r 0%|  | 0/3\r100%| | 3/3\n") == ["100%| | 3/3"]
    (tmp_path / "kept").write_text("a")
    (tmp_path / "changed").write_text("a")
    (tmp_path / "deleted").write_text("a")
    before = b.snapshot(tmp_path)
    (tmp_path / "changed").write_text("b")
    (tmp_path / "deleted").unlink()
    (tmp_path / ".f.pt.host.1.tmp").write_bytes(b"half")
    (tmp_path / ".f.pt.lock").write_bytes(b"")                  # file_lock's empty file is not lost
    (tmp_path / "half.pt").write_bytes(b"PK\x03\x04")
    assert b.files_lost(before, b.snapshot(tmp_path), tmp_path) == [
        "changed changed", "deleted deleted", "half-written or stray half.pt", "left .f.pt.host.1.tmp"]


def test_a_broken_promise_is_seen(fixtures, tmp_path):
    """The judge fails a run that exits 0, or prints two error lines, or names a flag the command lacks, or does
    not say what the case expects, or says what it must not, or takes too long."""
    case = b.dataclasses.replace(b.CASES["lr-zero"], avoid=("b --no",), seconds=1)
    outcome = b.prepare("lr-zero", case, tmp_path / "x", fixtures)
    before = b.snapshot(outcome.folder, fixtures.dir)
    b.judge(outcome, 0, "", "error: a\nerror: b --no-such-flag\n", before, fixtures, seconds=2)
    assert outcome.problems == ["exit 0", "2 `error:` lines", "names --no-such-flag, not a flag of train",
                                "does not say '--lr: must be positive'", "says 'b --no'", "took 2.0 s, more than 1 s"]


def test_a_control_fails_when_its_check_fails(fixtures, tmp_path):
    """A control that succeeds with the wrong result (a link followed) is not as promised."""
    case = b.CASES["folder-link-up-the-tree"]
    outcome = b.prepare("x", case, tmp_path / "x", fixtures)
    before = b.snapshot(outcome.folder, fixtures.dir)
    b.judge(outcome, 0, "", "", before, fixtures)             # no warning, and no features file
    assert outcome.problems[0].startswith("not one warning")
