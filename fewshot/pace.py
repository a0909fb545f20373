"""How the CLIP encoder runs on its device: its precision, batch sizes and data-loading workers (docs/speed.md).

The precision changes the features a little, so it is a setting of the features file (Settings.precision, part of
the view recipe); a lower one than float32 is adopted by "auto" only where its features match float32's to cosine
MATCH on a check batch (extraction.resolve_precision, choose_precision). The rest (batch sizes, workers,
channels-last) changes only the speed, and is recorded as how the file was encoded. Every forward pass runs under
inference mode.
"""
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewshot import backbones

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # features.PRECISIONS' dtypes
MATCH = 0.9999   # a lower precision is adopted only where its features match fp32's to this cosine
CHECK = 16       # images (view 0) and sentences in the batch that decides it


@dataclass(frozen=True)
class Pace:
    """How an encoding runs: its precision, and what changes only its speed."""
    precision: str = "fp32"     # autocast dtype of every forward pass: fp32 (no autocast), bf16 or fp16
    batch_size: int = 256       # image views per forward pass
    text_batch_size: int = 256  # sentences per forward pass
    workers: int = 0            # DataLoader processes decoding and augmenting the images beside the encoder

    def record(self, encoder: backbones.Encoder, device: torch.device) -> dict:
        """What a features file keeps of it ("encoding"): what was used, with the threads and the layout."""
        return {**dataclasses.asdict(self), "threads": torch.get_num_threads(),
                "channels_last": encoder.channels_last, "device": str(device)}


def cpu_cores() -> int:
    """The cores this process may run on (a container's share, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def native_bf16() -> bool:
    """True on a CPU that computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere it is emulated, and slower
    than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own (private) probes
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def fast_precision(device: torch.device) -> str:
    """The precision "auto" tries on `device`: bf16 on a CPU that has it in hardware, fp16 on CUDA (as OpenAI's
    CLIP runs there), else fp32."""
    if device.type == "cpu":
        return "bf16" if native_bf16() else "fp32"
    return "fp16" if device.type == "cuda" else "fp32"


def default_batch_size(convolutional: bool, precision: str, device: torch.device) -> int:
    """Views (or sentences) per forward pass, as measured in docs/speed.md. On a CPU: 16 for a convolutional tower
    (RN50 at 256 is 1.5x slower: its activations no longer fit the caches), 128 for a transformer in bf16 and 32
    in fp32 (bf16 needs large matrices to pay). On a GPU: 256."""
    if device.type != "cpu":
        return 256
    return 16 if convolutional else 128 if precision == "bf16" else 32


def default_workers(device: torch.device) -> int:
    """DataLoader processes. On a CPU the encoder's threads use every core, so as few as keep it fed: one per 8
    cores (a view costs a few ms of one core to decode and augment, and tens of ms to encode, docs/speed.md). On
    a GPU the CPU only decodes and augments: the CPU count, at most 8."""
    cores = cpu_cores()
    return max(1, cores // 8) if device.type == "cpu" else min(8, cores)


def autocast(device: torch.device, precision: str):
    """Autocast to `precision`'s dtype on `device`; fp32 runs as it is."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def image_features(encoder: backbones.Encoder, x: torch.Tensor, precision: str, device: torch.device):
    """[B, d] float32 features (not normalised) of images [B, 3, H, W], in the layout the model's weights use."""
    x = x.to(device, non_blocking=True)
    if encoder.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, precision):
        return encoder.model.encode_image(x).float()


def text_features(encoder: backbones.Encoder, tokens: torch.Tensor, precision: str, device: torch.device):
    """[S, d] float32 features (not normalised) of token ids [S, context_length]."""
    with torch.inference_mode(), autocast(device, precision):
        return encoder.model.encode_text(tokens.to(device)).float()


def choose_precision(encoder: backbones.Encoder, precision: str, device: torch.device, check) -> str:
    """`precision` if the features of the check batch (images [n, 3, H, W], token ids [m, context_length]) at it
    match fp32's to cosine MATCH or more, every image and sentence, saying so; else fp32, saying so once."""
    if precision == "fp32":
        return precision
    images, tokens = check
    cosines = [F.cosine_similarity(features(encoder, x, precision, device), features(encoder, x, "fp32", device))
               for features, x in ((image_features, images), (text_features, tokens)) if len(x)]
    cosine = torch.cat(cosines).nan_to_num(-1.0).min().item() if cosines else 1.0  # an overflow (NaN, inf) fails
    if cosine >= MATCH:
        print(f"encoding at {precision}: its features match fp32's to cosine {cosine:.5f} or more on a check batch "
              f"(--precision fp32 keeps float32)")
        return precision
    print(f"note: {precision} features match fp32's only to cosine {cosine:.5f} on a check batch, below {MATCH}: "
          f"encoding at fp32")
    return "fp32"


def choose_pace(encoder: backbones.Encoder, precision: str, batch_size: int | None, workers: int | None,
                device: torch.device) -> Pace:
    """The Pace of `encoder` at a chosen `precision` on `device`: the batch size and workers asked for or, where
    None, the device's and backbone's defaults."""
    return Pace(precision=precision,
                batch_size=batch_size or default_batch_size(encoder.channels_last, precision, device),
                text_batch_size=batch_size or default_batch_size(False, precision, device),
                workers=default_workers(device) if workers is None else workers)
