"""The torch device a command runs on, and the settings that make a seed's run repeatable on it."""
import os

import torch

from fewshot.errors import DataError


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


def deterministic():
    """The same seed on the same device gives the same accuracy."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)
