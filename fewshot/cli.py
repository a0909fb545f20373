"""What every command shares: its argument parser, the ranges of its numbers, its one-line errors, path flags
and the torch device.

Each command (extract_features.py, train.py, bench/reproduce.py, bench/report.py) builds its flags with Parser,
so that a bad command line gets one line, not argparse's whole usage; every number a flag feeds into a formula
is checked once, where it enters, against its row of RANGES; and each command runs inside guarded(), which
turns every error into one line: the user's (DataError, OSError) with what to do, and an unforeseen one with
the path of a log holding its traceback.
"""
import argparse
import math
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot_data import DataError, resolve_dataset


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line, not the whole usage. prog: the script's path."""

    def error(self, message):
        fail(f"{message} (python {self.prog} --help lists the options)")


def fail(message):
    """Exit non-zero with one clear line."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def guarded(prog, body):
    """Run a command's body; every exception ends in one line. What the user can fix (DataError and the models'
    ValueErrors, an OSError: permissions, a full disk, a name too long, ...) says so; anything else is a bug of
    ours, whose traceback goes to a log file that the line names, so that nothing reaches the user as a traceback."""
    try:
        return body()
    except ValueError as e:  # DataError, and the models' checks of their inputs (a ValueError naming the input)
        fail(e)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        fail(f"cannot use{where}: {e.strerror or e}; check the path, its permissions and the free space")
    except KeyboardInterrupt:
        fail("interrupted; files are written whole or not at all, so the same command can run again")
    except Exception as e:
        fd, log = tempfile.mkstemp(prefix=f"hegraphadapter-{Path(prog).stem}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"python {prog} {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
        fail(f"unexpected {type(e).__name__} ({str(e).splitlines()[0][:200] if str(e) else 'no message'}); this is a "
             f"bug: the full traceback is in {log}, please report it with the command you ran")


# ----------------------------------------------------------------------------- numbers: one table of ranges

@dataclass(frozen=True)
class Range:
    """Where a number may lie: finite, at least `low` (above it if `open_low`), at most `high`."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def holds(self, x) -> bool:
        above = self.low is None or (x > self.low if self.open_low else x >= self.low)
        return math.isfinite(x) and above and (self.high is None or x <= self.high)

    def describe(self) -> str:
        shown = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # 2^63 - 1 in full, 0.5 as 0.5
        if self.high is not None:
            return f"between {shown(self.low)} and {shown(self.high)}"
        if self.open_low:
            return "positive" if self.low == 0 else f"above {shown(self.low)}"
        return f"at least {shown(self.low)}"


FINITE = Range()  # any finite number
RANGES = {  # every number a flag feeds into a formula, by its destination (a config field, a recipe field, ...)
    # the few-shot task and its recipe
    "shots": Range(1), "epochs": Range(0), "lr": Range(0, open_low=True), "batch_size": Range(1),
    # the extraction
    "seeds": Range(0, 2**63 - 1), "max_shots": Range(1), "views": Range(1), "encode_batch_size": Range(1),
    "workers": Range(0),
    # HeGraphAdapter (HeGraphConfig) and the cache of Tip-Adapter (TipConfig)
    "alpha": Range(0), "gamma": Range(0, open_low=True), "lam": Range(0), "weight_scale": Range(0),
    "bias_scale": Range(0), **{f"beta_{path}": Range(0) for path in ("pn", "vn", "np", "np_test", "vp", "pp", "vv")},
    "neighbours": Range(0), "edge_temperature": Range(0),   # HeGraphConfig's graph designs: 0 turns them off
    # TaskRes, CLIP-Adapter, GraphAdapter, the linear probe
    "scale": Range(0), "ratio": Range(0, 1), "reduction": Range(1), "beta": Range(0, 1), "fusion": Range(0, 1),
    "inverse_l2": Range(0, open_low=True), "max_iter": Range(1),
}


def number_arg(name, kind=float):
    """argparse type of the flag of RANGES[name]: a `kind` number within its range, or one line saying which."""
    bounds = RANGES[name]

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not bounds.holds(x):
            raise argparse.ArgumentTypeError(f"must be {bounds.describe()}, got {text}")
        return x
    return parse


def path_arg(text: str) -> Path:
    """argparse type of every path flag: ~ is expanded, in "--flag ~/x" and "--flag=~/x" alike."""
    return Path(text).expanduser()


def dataset_arg(text: str) -> str:
    """argparse type of --dataset: a dataset key as it is, or a folder of class subfolders as its absolute path."""
    try:
        return resolve_dataset(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_device(name: str | None) -> torch.device:
    """--device as a torch.device (default: cuda if available, else cpu); one clear line if it cannot be used."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"--device {name}: Apple's MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):  # meta holds no data; xpu, hpu, ...: not what this code runs on
        raise DataError(f"--device {name}: this code runs on cpu, cuda or mps, not on {device.type}; use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                        f"use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    return device
