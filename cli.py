"""What every command shares: its argument parser, its one-line errors, path flags and the torch device.

Each command (extract_features.py, train.py, bench/reproduce.py) builds its flags with Parser, so that a bad
command line gets one line, not argparse's whole usage, and exits through fail() on any error the user can fix.
"""
import argparse
import sys
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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                        f"use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    return device
