"""
Bad inputs: what every bad input gets (docs/bad-inputs.md), measured on the real commands.

Each case of the registry (fewshot/testing/bad_inputs.py, which the tests also run, in-process) runs here as a real
command, `python train.py ...`, `python extract_features.py ...` or `python predict.py ...` in a subprocess
(OMP_NUM_THREADS=1, --device cpu --workers 0), on tiny fixtures built in a temporary folder
(fewshot/testing/fixtures.py's random CLIP, CoOp-layout datasets and synthetic features), and is judged by
the registry's rules:

- bad input gets exactly ONE `error: ...` line on stderr, as a terminal shows it (tqdm redraws a line after
  "\\r" and clears it when closed, so only the text after the last "\\r" of each line counts), and a non-zero
  exit; never an accuracy with exit 0;
- nothing is lost: every file that existed before (a sentinel "previous results" at --out, the inputs, the
  shared fixtures) is unchanged, nothing half-written appears, no hidden .*.tmp is left.

Control rows (a 16-bit PNG, --epochs 0, stale features files, a model evaluated without negatives, predict.py
on an image) are not bad inputs: they must succeed. Then four parallel runs: two extractions of one file with
different --views, two train.py jobs (--seeds 1, --seeds 2) extracting one file on demand (each pair takes turns
on the file, and it ends holding what both asked for), an extraction killed with kill -9 inside its write, then
run again, and two train.py runs of different methods saving into one --save folder.

    python bench/bad_inputs.py                      # every case, then the parallel runs
    python bench/bad_inputs.py --cases lr-zero nan-test --no-parallel
    python bench/bad_inputs.py --keep               # keep the temporary folder to look at the files

Exits 1 when any case or parallel run does not behave as promised. Each process spends 2-3.5 s of CPU
importing torch (and, for an extraction or a --clip-checkpoint, open_clip) before it reads its first flag, so the
~50 processes take about 2.5 CPU-minutes: 1.5 minutes on two idle cores (--jobs 2), more on a busy machine.
"""

import argparse
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewshot.cli import printable
from fewshot.features import load_features
from fewshot.testing.bad_inputs import (
    CASES,
    COMMON,
    FAMILIES,
    FEATURES,
    PREDICT_COMMON,
    Case,
    Fixtures,
    P,
    T,
    X,
    command,
    decode,
    judge,
    prepare,
    shown_lines,
    snapshot,
)


def case(script, args):
    """A parallel run's command as a case (no bad input: only its flags are used)."""
    return Case(script, "", args)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {T: "train.py", X: "extract_features.py", P: "predict.py"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",  # tiny models, busy machine, no download:
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),  # as in the tests
                                      *filter(None, [os.environ.get("PYTHONPATH")])])}


# -----------------------------------------------------------------------------
# the cases, each a real command

def script_argv(script, args):
    """python SCRIPT ARGS: a case's (or a parallel run's) real command."""
    return [sys.executable, str(ROOT / SCRIPTS[script]), *args]


STARTUP_S = 60  # what a process may take to import torch and open_clip on a busy machine, before its first flag
HANG_S = 300    # a case still running after this long hangs


def run_case(outcome, before, fx):
    """Run the case's command in its folder as a subprocess, then judge exit, stderr, stdout, time and files. A
    case with stand-ins (a local server, no network, a full disk) runs as python -m fewshot.testing.bad_inputs
    CASE ARGS: the same entry point, within its stand-ins, in a process of its own."""
    env = {**ENV, "HOME": str(outcome.folder)}       # ~ is the case's folder: whatever is written there is checked
    argv = [sys.executable, "-m", "fewshot.testing.bad_inputs", outcome.name, *outcome.argv] if outcome.case.within \
        else script_argv(outcome.case.script, outcome.argv)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=outcome.folder, env=env, capture_output=True, timeout=HANG_S)
    except subprocess.TimeoutExpired as e:  # killed: judged as what it printed, and as the hang it is
        judge(outcome, -9, decode(e.stdout or b""), decode(e.stderr or b""), before, fx)
        outcome.problems.append(f"still running after {HANG_S} s: killed")
        return outcome
    return judge(outcome, proc.returncode, decode(proc.stdout), decode(proc.stderr), before, fx,
                 time.perf_counter() - start, startup=STARTUP_S)


def run_cases(names, tmp, jobs=2):
    """Prepare every case (one at a time: fixtures are built on first use), take the checksums of every file,
    then run the cases, `jobs` at once. A case that is no bad input on this machine (--device cuda with CUDA) is
    left out."""
    fx = Fixtures(tmp / "shared")
    names = [n for n in names if not CASES[n].applies or CASES[n].applies()]
    outcomes = [prepare(name, CASES[name], tmp / "cases" / name, fx) for name in names]
    befores = [snapshot(o.folder, fx.dir) for o in outcomes]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda o, before: run_case(o, before, fx), outcomes, befores)), fx


# -----------------------------------------------------------------------------
# parallel runs

@dataclass
class Parallel:
    """One parallel scenario: what each process did, and whether the features file survived."""
    name: str
    processes: list = field(default_factory=list)   # (label, rc, error lines, stdout)
    problems: list = field(default_factory=list)

    @property
    def survived(self):
        return not self.problems


def start(argv, cwd):
    return subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_all(procs, timeout=300):
    """communicate() with every process at once (a full pipe must not stall one while another is read);
    [(stdout, stderr)] as text."""
    with ThreadPoolExecutor(len(procs)) as pool:
        return [(decode(out), decode(err)) for out, err in pool.map(lambda p: p.communicate(timeout=timeout), procs)]


def judge_processes(scenario, labels, procs, outputs, path, writers_allowed=(1,)):
    """Every process succeeded or printed exactly one error line; the file that remains is complete and was
    written by as many of them as allowed (one; or one or two where the second grows what the first wrote).
    Returns the writers' labels."""
    writers = []
    for label, proc, (out, err) in zip(labels, procs, outputs):
        errors = [line for line in shown_lines(err) if line.startswith("error:")]
        scenario.processes.append((label, proc.returncode, errors, out))
        if proc.returncode != 0 and (len(errors) != 1 or len(shown_lines(err)) != 1):
            scenario.problems.append(f"{label}: exit {proc.returncode} with {len(shown_lines(err))} stderr lines")
        if proc.returncode == 0 and errors:
            scenario.problems.append(f"{label}: exit 0 with an error line")
        if f"wrote {FEATURES}" in out:                 # the path as the command gave it
            writers.append(label)
    if len(writers) not in writers_allowed:
        scenario.problems.append(f"written by {len(writers)} processes ({writers})")
    try:
        load_features(path)
    except Exception as e:
        scenario.problems.append(f"the features file is not complete: {e}")
    leftovers = [p.name for p in path.parent.glob(".*.tmp")]
    if leftovers:
        scenario.problems.append(f"left {leftovers}")
    return writers


def check_holds(s, procs, path, setting, expected, shown=lambda value: value):
    """Both processes succeeded and the features file that remains holds what both asked for (`expected`)."""
    if any(p.returncode != 0 for p in procs):
        s.problems.append("a process failed")
    if path.exists():
        value = shown(torch.load(path, weights_only=True)["settings"][setting])
        if value != expected:
            s.problems.append(f"the file has {setting} {value}, not {expected}, which both runs together asked for")


def two_extractions(folder, fx):
    """extract_features.py --views 2 and --views 3 on one dataset and file, started together."""
    s = Parallel("2 x extract_features.py, `--views 2` and `--views 3`, one file")
    folder.mkdir(parents=True)
    argvs = [script_argv(X, command(case(X, f"--dataset dtd --root {{data}} --views {v}"), fx)) for v in (2, 3)]
    procs = [start(argv, folder) for argv in argvs]
    path = folder / FEATURES
    judge_processes(s, ["views 2", "views 3"], procs, finish_all(procs), path, writers_allowed=(1, 2))
    check_holds(s, procs, path, "views", 3)
    return s


def two_seed_jobs(folder, fx):
    """train.py --seeds 1 and --seeds 2, each extracting the same features file on demand, started together."""
    s = Parallel("2 x train.py, `--seeds 1` and `--seeds 2`, extracting one file")
    folder.mkdir(parents=True)
    argvs = [script_argv(T, command(case(T, f"--dataset dtd --root {{data}} --shots 2 --epochs 2 --seeds {seed} "
                                            f"--out r{seed}.json"), fx))
             for seed in (1, 2)]
    procs = [start(argv, folder) for argv in argvs]
    path = folder / FEATURES
    judge_processes(s, ["seeds 1", "seeds 2"], procs, finish_all(procs), path, writers_allowed=(2,))
    check_holds(s, procs, path, "seeds", [1, 2], sorted)   # in the order the two wrote them
    for seed, proc in zip((1, 2), procs):
        if proc.returncode == 0 and "test_accuracy" not in json.loads((folder / f"r{seed}.json").read_text()):
            s.problems.append(f"seeds {seed}: exit 0 without results")
    return s


def pipe_bytes(fd):
    """Bytes waiting in a pipe."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def blocked_writing(proc, reader):
    """True once the process has written into the pipe and sleeps in a pipe write (Linux: /proc/PID/wchan)."""
    wchan = Path(f"/proc/{proc.pid}/wchan")
    return pipe_bytes(reader) > 0 and "pipe_write" in (wchan.read_text() if wchan.exists() else "")


def killed_write(folder, fx):
    """kill -9 of an extraction inside its write, then the same command again.

    To kill it inside the write, not before or after, the temporary file the process will write
    (.dtd_NAME.pt.HOST.PID.tmp, write_atomic's naming) is made beforehand as a FIFO whose pipe holds one page:
    the process opens it, writes a few kB and sleeps in the middle of torch.save. It is killed there. The FIFO
    is then replaced by a plain file holding the bytes it wrote, which is what a killed write to a disk leaves.
    """
    s = Parallel("extract_features.py killed (`kill -9`) inside its write, then run again")
    folder.mkdir(parents=True)
    (folder / "features").mkdir()
    argv = script_argv(X, command(case(X, "--dataset dtd --root {data}"), fx))
    proc = start(argv, folder)
    tmp = folder / "features" / f".{Path(FEATURES).name}.{socket.gethostname()}.{proc.pid}.tmp"
    os.mkfifo(tmp)
    reader = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
    deadline = time.time() + 240
    while proc.poll() is None and not blocked_writing(proc, reader) and time.time() < deadline:
        time.sleep(0.02)
    if not blocked_writing(proc, reader):
        proc.kill()
        err = decode(proc.communicate()[1])
        os.close(reader)
        s.problems.append(f"the extraction never blocked in its write (exit {proc.returncode}): {err[-300:]}")
        return s
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    written = os.read(reader, 1 << 16)
    os.close(reader)
    tmp.unlink()
    tmp.write_bytes(written)            # what a killed write to a regular file leaves
    s.processes.append(("killed", proc.returncode, [], f"killed after writing {len(written)} bytes"))
    if (folder / FEATURES).exists():
        s.problems.append("a features file exists after the killed write")
    again = start(argv, folder)
    judge_processes(s, ["rerun"], [again], finish_all([again]), folder / FEATURES)
    if again.returncode != 0:
        s.problems.append("the rerun failed")
    return s


def two_saves(folder, fx):
    """train.py --method hegraph-t and --method hegraph with one --save folder, started together: one writes its
    models, the other waits for it, then is refused (the folder holds another run's), and nothing is mixed."""
    s = Parallel("2 x train.py, `--method hegraph-t` and `--method hegraph`, one `--save` folder")
    folder.mkdir(parents=True)
    argvs = [script_argv(T, command(case(T, f"--features {{feats}} --method {m} --shots 2 --epochs 2 --seeds 1 2 "
                                            f"--save ck --out r_{m}.json"), fx)) for m in ("hegraph-t", "hegraph")]
    procs = [start(argv, folder) for argv in argvs]
    outputs = finish_all(procs)
    for label, proc, (out, err) in zip(("hegraph-t", "hegraph"), procs, outputs):
        errors = [line for line in shown_lines(err) if line.startswith("error:")]
        s.processes.append((label, proc.returncode, errors, out))
        if proc.returncode != 0 and (len(errors) != 1 or "another run" not in errors[0]):
            s.problems.append(f"{label}: exit {proc.returncode} with {len(shown_lines(err))} stderr lines")
    if sorted(p.returncode == 0 for p in procs) != [False, True]:
        s.problems.append(f"exits {[p.returncode for p in procs]}: exactly one run should have saved")
    saved = sorted((folder / "ck").glob("seed*.pt"))
    methods = {torch.load(p, weights_only=True)["run"]["method"] for p in saved}
    if len(methods) != 1 or len(saved) != 2:
        s.problems.append(f"the folder holds {[p.name for p in saved]} of {sorted(methods)}")
    return s


PARALLEL = {"two-extractions": two_extractions, "two-seed-jobs": two_seed_jobs, "killed-write": killed_write,
            "two-saves": two_saves}


def run_parallel(tmp, fx):
    """The parallel scenarios, one after the other (each is two processes at once)."""
    return [scenario(tmp / "parallel" / name, fx) for name, scenario in PARALLEL.items()]


# -----------------------------------------------------------------------------
# the table

def cell(text, width=110):
    """A markdown table cell: one line, no pipes, at most `width` characters, bytes that are not UTF-8 (a case's
    Latin-1 names) escaped."""
    text = " ".join(printable(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def display(case):
    """The case's command as a reader should see it: the script and the case's own flags ($fixture for shared
    files; other paths are the case's own folder, the command's working directory)."""
    script = SCRIPTS[case.script]
    args = case.args.replace("{{", "\0").replace("}}", "\1").replace("{", "$").replace("}", "")
    return printable(f"`{script} {args.replace(chr(0), '{').replace(chr(1), '}')}`")


def table(outcomes):
    """The markdown table of the cases."""
    lines = ["| # | family | command | bad input | exit | `error:` lines | other stderr lines | files lost | "
             "as promised |", "|---:|---|---|---|---:|---|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        errors = f"{len(o.errors)}" + (f": {cell(o.errors[0])}" if o.errors else "")
        others = f"{len(o.others)}" + (f": {cell(o.others[0], 60)}" if o.others else "")
        lost = f"{len(o.lost)}" + (f": {cell('; '.join(o.lost), 80)}" if o.lost else "")
        verdict = "yes" if not o.problems else f"**NO**: {cell('; '.join(o.problems), 80)}"
        lines.append(f"| {i} | {o.case.family} | {display(o.case)} | {cell(o.case.bad)} | {o.rc} | {errors} | "
                     f"{others} | {lost} | {verdict} |")
    return "\n".join(lines)


def family_table(outcomes):
    """One row per family: its cases, how many got what is promised (one error line with the words they expect,
    in time; a control: success and its check), and the files lost."""
    lines = ["| family | cases | bad inputs with one clear error line | controls that succeed as checked | "
             "files lost |", "|---|---:|---:|---:|---:|"]
    for family in FAMILIES:
        mine = [o for o in outcomes if o.case.family == family]
        if not mine:
            continue
        bad, controls = [o for o in mine if not o.case.control], [o for o in mine if o.case.control]
        ok = lambda group: f"{sum(not o.problems for o in group)}/{len(group)}" if group else "–"
        lines.append(f"| {family} | {len(mine)} | {ok(bad)} | {ok(controls)} | {sum(len(o.lost) for o in mine)} |")
    return "\n".join(lines)


def what_it_did(label, rc, errors, out):
    """One process of a parallel run, in words: its exit, whether it waited for the lock, what it did."""
    text = f"{label}: exit {rc}" + (", waited" if "waiting for another process" in out else "")
    if errors:
        return f"{text}, {cell(errors[0], 90)}"
    if "wrote " in out:
        return f"{text}, wrote the file"
    return f"{text}, {out}" if label == "killed" else text


def parallel_table(scenarios):
    """The markdown table of the parallel runs."""
    lines = ["| parallel run | processes | survived |", "|---|---|---|"]
    for s in scenarios:
        verdict = "yes" if s.survived else f"**NO**: {cell('; '.join(s.problems), 100)}"
        lines.append(f"| {s.name} | {'; '.join(what_it_did(*p) for p in s.processes)} | {verdict} |")
    return "\n".join(lines)


def summary(outcomes, scenarios):
    """The closing line: bad inputs tried, those with exactly one error line, files lost, parallel runs survived."""
    bad = [o for o in outcomes if not o.case.control]
    controls = [o for o in outcomes if o.case.control]
    one_line = sum(len(o.errors) == 1 and not o.others and o.rc != 0 for o in bad)
    lost = sum(len(o.lost) for o in outcomes)
    survived = sum(s.survived for s in scenarios)
    return (f"bad inputs tried {len(bad)}, exactly one error line {one_line}, files lost {lost}, parallel runs "
            f"survived {survived}/{len(scenarios)} (controls passed {sum(not o.problems for o in controls)}/"
            f"{len(controls)})")


def failures(outcomes):
    """The exact command and output of every case that did not behave as promised."""
    text = []
    for o in outcomes:
        if o.problems:
            text.append(f"\n{o.name}: {'; '.join(o.problems)}\n  cd {o.folder} && "
                        f"{printable(shlex.join(script_argv(o.case.script, o.argv)))}  (--keep keeps "
                        f"the folder)\n"
                        f"  exit {o.rc}; stderr as shown:\n" + "".join(f"    {line}\n" for line in
                                                                     shown_lines(o.stderr)[:25]))
    return "".join(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                   help="run only these cases (default: all): " + ", ".join(CASES))
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), metavar="FAMILY",
                   help="run only the cases of these families: " + "; ".join(FAMILIES))
    p.add_argument("--no-parallel", action="store_true", help="skip the parallel runs")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = p.parse_args(argv)
    if args.families:
        args.cases = [name for name in args.cases if CASES[name].family in args.families]
    start_time = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    try:
        outcomes, fx = run_cases(args.cases, tmp, args.jobs)
        scenarios = [] if args.no_parallel else run_parallel(tmp, fx)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"Every command also gets `{COMMON.format(clip='$clip')}` (and train.py `--out results.json`, a "
          f"sentinel \"previous results\" file; predict.py only `{PREDICT_COMMON}`) first; its own flags follow. It "
          f"runs in the case's own folder; $feats, $data, $clip, $ck, $model, $photo, $other_clip are shared "
          f"fixtures.\n")
    print(family_table(outcomes))
    print()
    print(table(outcomes).replace(str(tmp), "$TMP"))  # the temporary folder, gone by now
    if scenarios:
        print()
        print(parallel_table(scenarios))
    print()
    print(summary(outcomes, scenarios))
    print(f"wall time {time.perf_counter() - start_time:.0f} s")
    broken = failures(outcomes)
    if broken:
        print("\nNot as promised:" + broken)
    return 1 if broken or not all(s.survived for s in scenarios) else 0


if __name__ == "__main__":
    sys.exit(main())
