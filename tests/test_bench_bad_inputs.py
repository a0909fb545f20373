"""bench/bad_inputs.py: its machinery on two real cases (one per command), and its judging on made-up output."""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bad_inputs


def cells(table):
    """The rows of a markdown table as lists of cells (an escaped \\| stays inside its cell)."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table.splitlines()[2:]]


def test_two_cases_give_exactly_one_error_line_and_lose_nothing(tmp_path):
    outcomes, _ = bad_inputs.run_cases(["nan-test", "workers-negative"], tmp_path)   # two processes at once
    header = bad_inputs.table(outcomes).splitlines()[0]
    assert "`error:` lines | other stderr lines | files lost" in header
    for _number, command, _bad, exit_code, errors, others, lost, verdict in cells(bad_inputs.table(outcomes)):
        assert exit_code != "0" and errors.startswith("1: error: ") and others == "0" and lost == "0", command
        assert verdict == "yes", command
    assert "'test.features'" in outcomes[0].errors[0] and "--workers" in outcomes[1].errors[0]
    assert bad_inputs.summary(outcomes, []).startswith("bad inputs tried 2, exactly one error line 2, files lost 0")
    assert (tmp_path / "cases" / "nan-test" / "results.json").read_bytes() == bad_inputs.SENTINEL


def test_judging_sees_what_a_terminal_shows_and_every_lost_file(tmp_path):
    # a progress bar redrawn after "\r" and cleared when closed shows nothing; one left behind is a line
    assert bad_inputs.shown_lines("\r 0%|  | 0/3\r   \r\nerror: x\n") == ["error: x"]
    assert bad_inputs.shown_lines("\r 0%|  | 0/3\r100%| | 3/3\n") == ["100%| | 3/3"]
    (tmp_path / "kept").write_text("a")
    (tmp_path / "changed").write_text("a")
    (tmp_path / "deleted").write_text("a")
    before = bad_inputs.snapshot(tmp_path)
    (tmp_path / "changed").write_text("b")
    (tmp_path / "deleted").unlink()
    (tmp_path / ".f.pt.host.1.tmp").write_bytes(b"half")
    (tmp_path / ".f.pt.lock").write_bytes(b"")                  # file_lock's empty file is not lost
    (tmp_path / "half.pt").write_bytes(b"PK\x03\x04")
    assert bad_inputs.files_lost(before, bad_inputs.snapshot(tmp_path), tmp_path) == [
        "changed changed", "deleted deleted", "half-written or stray half.pt", "left .f.pt.host.1.tmp"]
