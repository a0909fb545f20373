"""The registry of bad inputs (fewshot/testing/bad_inputs.py), run in this process through the commands' own
entry points: every case of every family gets exactly one error line naming only flags of its command, a
non-zero exit and no file lost; the controls succeed. bench/bad_inputs.py runs the same cases as real commands
for docs/bad-inputs.md. Also the judging itself, on made-up output."""
import pytest

from fewshot.testing import bad_inputs as b


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """The inputs every case copies and breaks: built once, on first use."""
    return b.Fixtures(tmp_path_factory.mktemp("shared"))


@pytest.mark.parametrize("name", list(b.CASES))
def test_a_bad_input_gets_one_error_line_and_loses_nothing(name, fixtures, tmp_path):
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
    """The judge fails a run that exits 0, or prints two error lines, or names a flag the command lacks."""
    case = b.CASES["lr-zero"]
    outcome = b.prepare("lr-zero", case, tmp_path / "x", fixtures)
    before = b.snapshot(outcome.folder, fixtures.dir)
    b.judge(outcome, 0, "", "error: a\nerror: b --no-such-flag\n", before, fixtures)
    assert outcome.problems == ["exit 0", "2 `error:` lines", "names --no-such-flag, not a flag of train"]
