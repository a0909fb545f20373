"""Tiny inputs built on disk, shared by the tests and bench/bad_inputs.py: random-weight CLIP checkpoints,
small image datasets in CoOp's layout, and synthetic features files. Nothing is downloaded.

    clip = tiny_clip(tmp / "clip.pt", "vit")               # loadable with --clip-checkpoint
    root = write_dataset(tmp / "data", "dtd")              # 3 classes, unequal counts per split
    mine = write_image_folder(tmp / "mine", {"red_panda": 8, "snow-leopard": 9})  # --dataset PATH
    feats = synthetic_features(tmp / "f.pt", C=10)         # train.py --features
"""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts at the repository root
import fewshot_data as fd  # noqa: E402
from features_file import FORMAT  # noqa: E402

TINY_CLIPS = {  # kind -> clip.model.CLIP's vision arguments: layers, width, patch size, input resolution
    "vit": (1, 64, 16, 32),             # ViT: 32 px input, 16 px patches, one layer
    "resnet": ((1, 1, 1, 1), 16, None, 32),  # ModifiedResNet with attention pooling, width 16
}


def unit(x):
    """Rows to unit length, written out (tests compare the code's normalize() against it)."""
    return x / x.norm(dim=-1, keepdim=True)


def tiny_clip(path: Path, kind: str = "vit") -> Path:
    """A random CLIP (d = 32, about 6-7 MB) saved as a plain float16 state_dict, loadable with clip.load(path).

    clip.load infers every size from the weights; it fixes heads = width // 64, hence the widths of 64.
    """
    with warnings.catch_warnings():  # clip.py imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        import clip
    layers, width, patch, resolution = TINY_CLIPS[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = clip.model.CLIP(embed_dim=32, image_resolution=resolution, vision_layers=layers,
                                vision_width=width, vision_patch_size=patch, context_length=77,
                                vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def write_image(path: Path, seed: int):
    """A small random JPEG (not square, so that resizing and cropping are exercised)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((48, 36)).save(path)


def _counts(num_classes: int, counts):
    """Images per class and split: unequal by default (train 5, 6, 7, ...; val 4, 5, ...; test 2, 3, ...)."""
    default = {"train": [5 + c % 3 for c in range(num_classes)], "val": [4 + c % 2 for c in range(num_classes)],
               "test": [2 + c % 2 for c in range(num_classes)]}
    return {**default, **(counts or {})}


def _write_imagenet_like(root: Path, key: str, spec, counts, classnames, subset, seed):
    """ImageNet (images/train, images/val) or a shift set (one folder per class present) with classnames.txt."""
    folder, images = root / spec.folder, root / spec.folder / spec.images
    wnids = [f"n{c:08d}" for c in range(len(classnames))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(wnids, classnames)))
    if spec.layout == "imagenet":
        for split, sub in (("train", "train"), ("test", "val")):
            for c, n in enumerate(counts[split]):
                for i in range(n):
                    write_image(images / sub / wnids[c] / f"{wnids[c]}_{i}.JPEG", next(seed))
        return
    present = range(len(classnames)) if subset is None else subset
    for j, c in enumerate(present):
        name = str(c) if key == "imagenetv2" else wnids[c]  # v2 names its folders by class index
        for i in range(counts["test"][j % len(counts["test"])]):
            write_image(images / name / f"{i}.jpg", next(seed))
    images.mkdir(parents=True, exist_ok=True)
    (images / "README.txt").write_text("not a class folder\n")  # as in ImageNet-A's archive


def write_dataset(root: Path, key: str, num_classes: int = 3, counts=None, subset=None) -> Path:
    """Write dataset `key` in CoOp's layout under `root`; returns `root`.

    counts: {"train"|"val"|"test": [images per class]} overriding the defaults.
    subset: for ImageNet shift sets, the ImageNet class indices that have a folder (default: all).
    """
    spec = fd.DATASETS[key]
    folder, images = root / spec.folder, root / spec.folder / spec.images
    counts = _counts(num_classes, counts)
    classnames = [f"class {chr(97 + c)}_{c}" for c in range(num_classes)]  # spaces and underscores on purpose
    seed = iter(range(10**6))
    if spec.layout in ("imagenet", "shift"):
        _write_imagenet_like(root, key, spec, counts, classnames, subset, seed)
        return root
    split = {s: [] for s in ("train", "val", "test")}
    for s, per_class in counts.items():
        for c, n in enumerate(per_class):
            for i in range(n):
                rel = f"{c}_{s}_{i}.jpg" if spec.layout == "fgvc" else f"{classnames[c]}/{s}_{i}.jpg"
                write_image(images / rel, next(seed))
                split[s].append([rel, c, classnames[c]])
    if spec.layout == "fgvc":
        (folder / "variants.txt").write_text("".join(f"{c}\n" for c in classnames))
        for s, items in split.items():
            (folder / f"images_variant_{s}.txt").write_text("".join(f"{rel[:-4]} {name}\n" for rel, _, name in items))
    else:
        (folder / spec.split).write_text(json.dumps(split))
    return root


def write_image_folder(folder: Path, counts: dict, seed: int = 0) -> Path:
    """A folder dataset of your own: folder/<class folder>/<i>.jpg, counts = {class folder: images}; returns it."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(folder / name / f"{i}.jpg", seed + 1000 * c + i)
    return folder


def synthetic_features(path, C=10, d=32, max_shots=4, views=3, test_per_class=30, text_noise=1.2,
                       backbone="synthetic", seeds=(1, 2, 3), negatives=True, seed=0):
    """A features file in the documented format for a task whose classes are Gaussian blobs on the sphere.

    The positive text features are the class centres pushed away by text_noise, so zero-shot is weak
    and the few-shot images carry the information.
    """
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(C, d, generator=g), dim=-1)                    # [C, d]
    images = lambda labels: F.normalize(centres[labels] + 0.25 * torch.randn(len(labels), d, generator=g), dim=-1)
    pool = 2 * max_shots                                                              # train images per class
    train_labels = torch.arange(C).repeat_interleave(pool)                            # [N]
    train_views = torch.stack([images(train_labels) for _ in range(views)])          # [V, N, d]
    test_labels = torch.arange(C).repeat_interleave(test_per_class)
    val_labels = torch.arange(C).repeat_interleave(4)
    text = F.normalize(centres + text_noise * F.normalize(torch.randn(C, d, generator=g), dim=-1), dim=-1)
    fewshot = {s: torch.stack([c * pool + torch.randperm(pool, generator=g)[:max_shots] for c in range(C)])
               for s in seeds}
    data = {
        "format": FORMAT, "dataset": "synthetic", "backbone": backbone, "logit_scale": 100.0,
        "classnames": [f"class {c}" for c in range(C)], "prompts": {"positive": [], "negative": []},
        "text": {"positive": text.half()},
        "train": {"features": train_views.half(), "labels": train_labels},
        "val": {"features": images(val_labels).half(), "labels": val_labels},
        "test": {"features": images(test_labels).half(), "labels": test_labels},
        "fewshot": fewshot,
        "val_fewshot": {s: torch.arange(C * 4).view(C, 4) for s in seeds},
    }
    if negatives:
        data["text"]["negative"] = F.normalize(-text + 0.5 * torch.randn(C, d, generator=g), dim=-1).half()
    torch.save(data, path)
    return path
