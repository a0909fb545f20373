"""bench/bench_extract.py as a command, on the tiny CLIPs (--quick, one thread, no worker processes): it prints the
bare encoder's grid, the loader alone and end to end with the ratio to the best bare encoder and the speed-up over
today's settings, the README's main command, and a whole extract_features call (no timing claims here)."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_extract.py"


def table(out: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `header`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_it_prints_the_three_throughputs_the_ratio_and_the_speed_up():
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    grid = table(out, "| backbone | precision | layout |")
    best = {}
    for backbone, precision, layout, _, rate, cpu_ms in grid:
        best[backbone] = max(best.get(backbone, 0), float(rate.split()[0]))
        assert float(cpu_ms) >= 0
        assert precision in ("fp32", "bf16") and layout in ("contiguous", "channels_last"), grid
    assert sum(r[4].endswith("*") for r in grid) == 2                    # one best per backbone
    assert ["tiny-resnet", "fp32", "contiguous", "256"] in [r[:4] for r in grid]   # today's encoder beside
    rows = table(out, "| backbone | images | settings |")
    assert {(r[0], r[1], r[2]) for r in rows} >= {(b, s, "today") for b in best
                                                  for s in ("train (10 views)", "test (1 view)")}
    for backbone, _, settings, _, loader, e2e, ratio, speedup, cosine in rows:
        (loader, loader_ms), (e2e, e2e_ms) = (cell.rstrip(")").split(" (") for cell in (loader, e2e))
        assert min(map(float, (loader, e2e))) > 0 and min(map(float, (loader_ms, e2e_ms))) >= 0
        assert abs(float(ratio) - float(e2e) / best[backbone]) < 0.01 + 0.01 * float(ratio)   # e2e / best bare
        assert settings != "today" or speedup == "1.00x"
        assert float(cosine) >= 0.9999                                   # the chosen features match fp32's
    readme = table(out, "| backbone | settings | images/s |")
    assert {r[0] for r in readme} == set(best) and all(float(r[2]) > 0 for r in readme)
    whole = [line for line in out.splitlines() if "extract_features on dataset/" in line]
    assert len(whole) == 2 and all("recorded precision" in line for line in whole)
