"""bench/bench_speed.py as a command, at tiny sizes: it times both models' training steps, the batch and the
whole few-shot set (no timing claims here; the memory subprocesses are skipped, 4 s each)."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_speed.py"


def test_it_times_and_measures_both_models_at_a_tiny_size():
    out = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--classes", "6", "--dim", "16", "--shots",
                          "2", "--batch", "8", "--warmup", "1", "--repeats", "2", "--threads", "1", "--no-memory"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    # C, N, batch, full ms, Tip-F ms, ratio, full MiB, Tip-F MiB: the batch row and the whole-set row
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+6\s+12\s", line)]
    assert [r[2] for r in rows] == ["8", "12"], out
    for r in rows:
        full_ms, tipf_ms, ratio = map(float, r[3:6])
        assert full_ms > 0 and tipf_ms > 0 and ratio > 0
        assert r[6:8] == ["nan", "nan"]                                  # no memory measured


def test_it_times_coop_against_tip_f(tiny_open_clip_dir):
    """--coop: CoOp's step through a CLIP text encoder (here the tiny open_clip folder, d = 24) beside Tip-F's."""
    out = subprocess.run([sys.executable, str(BENCH), "--coop", "--coop-backbone", f"local-dir:{tiny_open_clip_dir}",
                          "--device", "cpu", "--classes", "6", "--dim", "24", "--shots", "2", "--batch", "8",
                          "--warmup", "1", "--repeats", "2", "--threads", "1", "--no-memory"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "CoOp ms" in out and "Tip-F ms" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+6\s+12\s", line)]
    assert [r[2] for r in rows] == ["8", "12"] and all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows), out
