"""Tiny inputs built on disk, shared by the tests and bench/bad_inputs.py: random-weight CLIP checkpoints,
small image datasets in CoOp's layout, and synthetic features files. Nothing is downloaded.

    clip = tiny_clip(tmp / "clip.pt", "vit")               # loadable with --clip-checkpoint
    model = tiny_open_clip(tmp / "tiny")                    # loadable with --backbone local-dir:tmp/tiny
    root = write_dataset(tmp / "data", "dtd")              # 3 classes, unequal counts per split
    mine = write_image_folder(tmp / "mine", {"red_panda": 8, "snow-leopard": 9})  # --dataset PATH
    feats = synthetic_features(tmp / "f.pt", C=10)         # train.py --features
"""
import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import fewshot.datasets as fd
from fewshot.features import FORMAT


@dataclass(frozen=True)
class OpenAIArch:
    """The sizes of a CLIP in OpenAI's checkpoint format: all that clip.load or open_clip read from its weights."""
    vision_layers: int | tuple[int, ...]   # ViT: transformer blocks; ModifiedResNet: bottlenecks per stage
    vision_width: int                      # ViT: token width (heads = width // 64); ResNet: stem width (x32 at the end)
    patch_size: int | None                 # ViT patch size; None for a ModifiedResNet
    image_size: int = 32                   # input resolution in pixels
    embed_dim: int = 32                    # d, the joint image-text embedding size
    text_width: int = 64                   # text transformer width (heads = width // 64)
    text_layers: int = 1                   # text transformer blocks
    context_length: int = 77               # tokens per sentence
    vocab_size: int = 49408                # OpenAI's BPE vocabulary: the tokenizer's ids need all of it


TINY_CLIPS = {
    "vit": OpenAIArch(vision_layers=1, vision_width=64, patch_size=16),          # 32 px input, 2 x 2 patches
    "resnet": OpenAIArch(vision_layers=(1, 1, 1, 1), vision_width=16, patch_size=None),  # attention pooling
}
TINY_NAMES = {  # their names, read from their weights (backbones.arch_name): what files and results call them
    "vit": "ViT-l1-w64-p16-32px-d32",
    "resnet": "RN-l1.1.1.1-w16-32px-d32",
}


def unit(x):
    """Rows to unit length, written out (tests compare the code's normalize() against it)."""
    return x / x.norm(dim=-1, keepdim=True)


def _blocks(prefix: str, width: int, layers: int) -> dict:
    """{key: shape} of `layers` residual attention blocks of `width` (OpenAI's Transformer)."""
    shapes = {}
    for i in range(layers):
        b = f"{prefix}.resblocks.{i}"
        shapes |= {f"{b}.attn.in_proj_weight": (3 * width, width), f"{b}.attn.in_proj_bias": (3 * width,),
                   f"{b}.attn.out_proj.weight": (width, width), f"{b}.attn.out_proj.bias": (width,),
                   f"{b}.ln_1.weight": (width,), f"{b}.ln_1.bias": (width,),
                   f"{b}.mlp.c_fc.weight": (4 * width, width), f"{b}.mlp.c_fc.bias": (4 * width,),
                   f"{b}.mlp.c_proj.weight": (width, 4 * width), f"{b}.mlp.c_proj.bias": (width,),
                   f"{b}.ln_2.weight": (width,), f"{b}.ln_2.bias": (width,)}
    return shapes


def _batch_norm(prefix: str, channels: int) -> dict:
    return {f"{prefix}.{k}": (channels,) for k in ("weight", "bias", "running_mean", "running_var")} | \
        {f"{prefix}.num_batches_tracked": ()}


def _resnet(a: OpenAIArch) -> dict:
    """{key: shape} of OpenAI's ModifiedResNet: 3-conv stem, bottleneck stages (expansion 4), attention pool."""
    w = a.vision_width
    shapes = {"visual.conv1.weight": (w // 2, 3, 3, 3), "visual.conv2.weight": (w // 2, w // 2, 3, 3),
              "visual.conv3.weight": (w, w // 2, 3, 3)}
    shapes |= _batch_norm("visual.bn1", w // 2) | _batch_norm("visual.bn2", w // 2) | _batch_norm("visual.bn3", w)
    inplanes = w
    for stage, blocks in enumerate(a.vision_layers):
        planes = w * 2 ** stage
        for i in range(blocks):
            b = f"visual.layer{stage + 1}.{i}"
            shapes |= {f"{b}.conv1.weight": (planes, inplanes, 1, 1), f"{b}.conv2.weight": (planes, planes, 3, 3),
                       f"{b}.conv3.weight": (4 * planes, planes, 1, 1)}
            shapes |= _batch_norm(f"{b}.bn1", planes) | _batch_norm(f"{b}.bn2", planes) | \
                _batch_norm(f"{b}.bn3", 4 * planes)
            if i == 0:  # stride or width change: a downsampling shortcut (avg pool, 1x1 conv, batch norm)
                shapes |= {f"{b}.downsample.0.weight": (4 * planes, inplanes, 1, 1)} | \
                    _batch_norm(f"{b}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    out, grid = 32 * w, a.image_size // 32
    shapes["visual.attnpool.positional_embedding"] = (grid * grid + 1, out)
    for proj in ("k_proj", "q_proj", "v_proj"):
        shapes |= {f"visual.attnpool.{proj}.weight": (out, out), f"visual.attnpool.{proj}.bias": (out,)}
    return shapes | {"visual.attnpool.c_proj.weight": (a.embed_dim, out), "visual.attnpool.c_proj.bias": (a.embed_dim,)}


def _vit(a: OpenAIArch) -> dict:
    """{key: shape} of OpenAI's VisionTransformer."""
    w, grid = a.vision_width, a.image_size // a.patch_size
    return {"visual.class_embedding": (w,), "visual.positional_embedding": (grid * grid + 1, w),
            "visual.proj": (w, a.embed_dim), "visual.conv1.weight": (w, 3, a.patch_size, a.patch_size),
            "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
            **_blocks("visual.transformer", w, a.vision_layers),
            "visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,)}


def openai_shapes(a: OpenAIArch) -> dict:
    """{key: shape} of every tensor of an OpenAI-format CLIP state dict (as clip/model.py names them)."""
    tw = a.text_width
    return {"positional_embedding": (a.context_length, tw), "text_projection": (tw, a.embed_dim),
            "logit_scale": (), **(_vit(a) if a.patch_size else _resnet(a)),
            **_blocks("transformer", tw, a.text_layers),
            "token_embedding.weight": (a.vocab_size, tw), "ln_final.weight": (tw,), "ln_final.bias": (tw,)}


def _draw(key: str, shape: tuple) -> torch.Tensor:
    """One tensor of a random CLIP, drawn from a generator seeded by its key alone, at a scale that keeps the
    activations of every layer near unit size (what a trained model has, so float16 neither under- nor overflows)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    randn = lambda: torch.randn(shape, generator=g)
    name = key.rsplit(".", 1)[-1]
    if key == "logit_scale":
        return torch.tensor(math.log(1 / 0.07))        # CLIP's initial temperature: exp() = 14.29, not 100
    if name == "num_batches_tracked":
        return torch.tensor(0)
    if name == "running_var":
        return 0.5 + 0.5 * torch.rand(shape, generator=g)
    if "ln_" in key or ".bn" in key or key.endswith("downsample.1.weight") or key.endswith("downsample.1.bias"):
        return (1.0 if name == "weight" else 0.0) + 0.1 * randn()  # norms: weight near 1, bias and mean near 0
    if key in ("text_projection", "visual.proj") or "positional_embedding" in key or "class_embedding" in key:
        return randn() * shape[-1] ** -0.5           # [in, out] projections and embeddings
    if key == "token_embedding.weight":
        return randn()                                 # unit entries, as nn.Embedding: the words tell sentences apart
    if len(shape) == 4 and key != "visual.conv1.weight" or "attnpool" in key and len(shape) == 2:
        # the ResNet's convolutions after the first and its attention pool read ReLU outputs, whose common
        # positive mean would swamp what tells images apart (a trained net's batch norm removes it): each output
        # unit's weights are centred, and He's gain sqrt(2) makes up for the half that ReLU cuts off
        w = randn()
        return (w - w.mean(dim=tuple(range(1, w.ndim)), keepdim=True)) * (2 / math.prod(shape[1:])) ** 0.5
    if len(shape) >= 2:                               # [out, in] linear weights
        return randn() * math.prod(shape[1:]) ** -0.5
    return 0.02 * randn()                             # biases


def openai_state_dict(a: OpenAIArch) -> dict:
    """A random CLIP as OpenAI's released checkpoints hold it (float16, clip/model.py's key names), built without
    any CLIP library, so that the same weights can be rebuilt whatever library loads them."""
    return {k: (t.half() if t.is_floating_point() else t) for k, t in
            ((k, _draw(k, shape)) for k, shape in openai_shapes(a).items())}


def tiny_clip(path: Path, kind: str = "vit") -> Path:
    """A tiny random CLIP (d = 32, about 6-7 MB, most of it the token embedding) saved as a plain float16
    state dict in OpenAI's format: what --clip-checkpoint reads. kind: a key of TINY_CLIPS."""
    torch.save(openai_state_dict(TINY_CLIPS[kind]), path)
    return path


TINY_OPEN_CLIP = {  # open_clip_config.json of a tiny open_clip-native CLIP, unlike OpenAI's in every setting it has
    "model_cfg": {"embed_dim": 24,                                           # d = 24
                  "vision_cfg": {"image_size": 48, "layers": 1, "width": 64, "patch_size": 16},  # 3 x 3 patches
                  "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 0.75], "interpolation": "bilinear",
                       "resize_mode": "squash"},
}
TINY_OPEN_CLIP_SCALE = 50.0  # its logit scale, exp(logit_scale): neither OpenAI's 100 nor the initial 14.3


def tiny_open_clip(folder: Path) -> Path:
    """A random open_clip CLIP in open_clip's model-folder layout (open_clip_config.json and
    open_clip_model.safetensors, as on the Hugging Face hub), loadable with --backbone local-dir:FOLDER."""
    import open_clip
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP, indent=1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(**TINY_OPEN_CLIP["model_cfg"])
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    state["logit_scale"] = torch.tensor(math.log(TINY_OPEN_CLIP_SCALE)).half()
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def state_dict_sha256(state: dict) -> str:
    """A hash of a state dict's keys, shapes, dtypes and values (what a reference was computed with)."""
    digest = hashlib.sha256()
    for k in sorted(state):
        t = state[k].contiguous()
        digest.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def write_image(path: Path, seed: int):
    """A small random JPEG (not square, so that resizing and cropping are exercised)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((48, 36)).save(path)


def redraw_image(path: Path, seed: int):
    """Another random picture at `path` whose byte size and modification time are those of the one it replaces
    (what only the content, the ctime and a hash tell apart): a JPEG of the same size is searched among seeds."""
    stat, new = path.stat(), path.with_name(f".{path.name}.new.jpg")
    for s in range(seed, seed + 2000):
        write_image(new, s)
        if new.stat().st_size == stat.st_size:
            break
    else:
        raise AssertionError(f"no random JPEG of {stat.st_size} bytes")
    os.replace(new, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


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


def same_features(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two tensors equal, float16 features to one unit in their last place: CLIP's kernels change the last float32
    bits of an image's features with the batch it is encoded in (about 6e-7, measured), which can round a stored
    float16 one unit apart, and a grown features file encodes an image in another batch than a fresh extraction."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype != torch.float16:
        return torch.equal(a, b)
    return bool(((a.float() - b.float()).abs() <= 2 ** -10 * b.float().abs() + 2 ** -24).all())
