"""Shared test fixtures: tiny random CLIP checkpoints and tiny datasets in CoOp's layout, all on disk.

    def test_something(tiny_vit_checkpoint, make_dataset):
        root = make_dataset("dtd")                       # 3 classes, unequal counts
        path = extract_features("dtd", root, tmp_path, clip_checkpoint=tiny_vit_checkpoint,
                                seeds=(1, 2), max_shots=4, views=2, workers=0)
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import the scripts at the repository root

with warnings.catch_warnings():  # clip.py imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip  # noqa: E402

import fewshot_data as fd  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP threads made a
# 32-px ResNet forward 100x slower (1 s instead of 10 ms).
torch.set_num_threads(1)


def _tiny_clip(path: Path, vision_layers, vision_width: int, patch_size, resolution: int) -> Path:
    """A random CLIP saved as a plain float16 state_dict, loadable with clip.load(path, device="cpu").

    clip.load infers every size from the weights; it fixes heads = width // 64, hence the widths of 64.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = clip.model.CLIP(embed_dim=32, image_resolution=resolution, vision_layers=vision_layers,
                                vision_width=vision_width, vision_patch_size=patch_size, context_length=77,
                                vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory) -> Path:
    """A ViT-style CLIP: 32 px input, 16 px patches, one layer, d = 32 (about 6 MB)."""
    return _tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_vit.pt", 1, 64, 16, 32)


@pytest.fixture(scope="session")
def tiny_resnet_checkpoint(tmp_path_factory) -> Path:
    """A ResNet-style CLIP (ModifiedResNet, attention pool): 32 px input, width 16, d = 32 (about 7 MB)."""
    return _tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_resnet.pt", (1, 1, 1, 1), 16, None, 32)


def _image(path: Path, seed: int):
    """A small random JPEG (not square, so that resizing and cropping are exercised)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((48, 36)).save(path)


def _counts(num_classes: int, counts):
    """Images per class and split: unequal by default (train 5, 6, 7, ...; val 4, 5, ...; test 2, 3, ...)."""
    default = {"train": [5 + c % 3 for c in range(num_classes)], "val": [4 + c % 2 for c in range(num_classes)],
               "test": [2 + c % 2 for c in range(num_classes)]}
    return {**default, **(counts or {})}


def write_dataset(root: Path, key: str, num_classes: int = 3, counts=None, subset=None) -> Path:
    """Write dataset `key` in CoOp's layout under `root`; returns `root`.

    counts: {"train"|"val"|"test": [images per class]} overriding the defaults.
    subset: for ImageNet shift sets, the ImageNet class indices that have a folder (default: all).
    """
    spec = fd.DATASETS[key]
    folder = root / spec.folder
    images = folder / spec.images
    counts = _counts(num_classes, counts)
    classnames = [f"class {chr(97 + c)}_{c}" for c in range(num_classes)]  # spaces and underscores on purpose
    seed = iter(range(10**6))

    if spec.layout in ("imagenet", "shift"):
        wnids = [f"n{c:08d}" for c in range(num_classes)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(wnids, classnames)))
        if spec.layout == "imagenet":
            for split, sub in (("train", "train"), ("test", "val")):
                for c, n in enumerate(counts[split]):
                    for i in range(n):
                        _image(images / sub / wnids[c] / f"{wnids[c]}_{i}.JPEG", next(seed))
        else:
            present = range(num_classes) if subset is None else subset
            for j, c in enumerate(present):
                name = str(c) if key == "imagenetv2" else wnids[c]  # v2 names its folders by class index
                for i in range(counts["test"][j % len(counts["test"])]):
                    _image(images / name / f"{i}.jpg", next(seed))
            images.mkdir(parents=True, exist_ok=True)
            (images / "README.txt").write_text("not a class folder\n")  # as in ImageNet-A's archive
        return root

    split = {s: [] for s in ("train", "val", "test")}
    for s, per_class in counts.items():
        for c, n in enumerate(per_class):
            for i in range(n):
                rel = f"{c}_{s}_{i}.jpg" if spec.layout == "fgvc" else f"{classnames[c]}/{s}_{i}.jpg"
                _image(images / rel, next(seed))
                split[s].append([rel, c, classnames[c]])
    if spec.layout == "fgvc":
        (folder / "variants.txt").write_text("".join(f"{c}\n" for c in classnames))
        for s, items in split.items():
            (folder / f"images_variant_{s}.txt").write_text(
                "".join(f"{rel[:-4]} {name}\n" for rel, _, name in items))
    else:
        (folder / spec.split).write_text(json.dumps(split))
    return root


@pytest.fixture(scope="session")
def make_dataset(tmp_path_factory):
    """Factory: make_dataset(key, num_classes=3, counts=None, subset=None) -> a fresh root folder."""
    def make(key: str, **kwargs) -> Path:
        return write_dataset(tmp_path_factory.mktemp(f"data_{key}"), key, **kwargs)
    return make
