"""Extract frozen CLIP features of a few-shot dataset into one file (its contract: features_file.py).

    python extract_features.py --dataset dtd --root DATA --backbone RN50 --features-dir features/
    python extract_features.py --dataset path/to/my_images     # a folder of class subfolders (docs/datasets.md)
    python extract_features.py --dataset dtd --root DATA --backbone ViT-B-16 --pretrained laion2b_s34b_b88k

The datasets (CoOp's layouts, split files, templates and few-shot protocol) and the prompts are read by
fewshot_data.py, the CLIP is named and loaded by backbones.py; the augmented training views are Tip-Adapter's
(Zhang et al., 2022). Here: decoding the images, encoding images and prompts with CLIP, and this command's
flags, which train.py and bench/reproduce.py share. All features are L2-normalised float16. Only the images
some seed needs are encoded, plus the test split.
"""
import dataclasses
import hashlib
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import backbones
from cli import RANGES, Parser, dataset_arg, guarded, number_arg, path_arg, resolve_device
from download import cupl_prompts, download_dataset
from features_file import (
    FORMAT,
    Settings,
    acquire,
    check_served,
    existing,
    features_path,
    file_lock,
    reusable,
    write_atomic,
)
from fewshot_data import (
    CUPL,
    LAYOUT_HINT,
    VAL_SHOTS,
    DataError,
    Splits,
    dataset_folder,
    dataset_name,
    dataset_spec,
    dataset_template,
    fewshot_rows,
    is_folder,
    load_prompts,
    load_splits,
    resolve_dataset,
)

# ----------------------------------------------------------------------------- encoding

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB.

    convert("RGB") clips the integer modes to 0..255, so a 16-bit image would come out almost white. They
    are scaled to 8 bits first, by the range their values are stored in: the 16-bit modes (I;16, I;16B, ...)
    and I (32-bit integers, which some decoders give for 16-bit PNG, TIFF or PGM files) as 0..65535 (/ 257),
    F (floats) as 0..1. An image whose values fall outside that range has no range to go by, so it is scaled
    by its own min..max.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image.convert("RGB")
    x = np.asarray(image, dtype=np.float64)                                    # [H, W]
    lo, hi = 0.0, 1.0 if image.mode == "F" else 65535.0
    if x.size and (x.min() < lo or x.max() > hi):
        lo, hi = x.min(), (x.max() if x.max() > x.min() else x.min() + 1)  # a constant image: black
    gray = np.round((x - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)  # [H, W]
    return Image.fromarray(gray).convert("RGB")


class Views:
    """One decoded image -> [V, 3, H, W]: view 0 is the model's own eval transform, the others Tip-Adapter's
    augmentation (a random crop of 50-100% of the image, resized, and a random flip) at the model's input size,
    with its resampling, mean and std."""

    def __init__(self, transform, preprocess: backbones.Preprocess, views: int):
        import torchvision.transforms as T  # here: train.py imports this module and never augments (1.5 s saved)
        self.transform, self.size, self.views = transform, preprocess.size, views
        resample = T.InterpolationMode.BILINEAR if preprocess.interpolation == "bilinear" else \
            T.InterpolationMode.BICUBIC
        self.augment = T.Compose([
            T.RandomResizedCrop(preprocess.size, scale=(0.5, 1), interpolation=resample),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(preprocess.mean, preprocess.std),
        ])

    def __call__(self, image: Image.Image, key: str) -> torch.Tensor:
        out = [self.transform(image)]
        # seed the CPU generator from the file and view only (restored afterwards): the same crops on
        # every run, machine and worker, so a second run writes the same file
        with torch.random.fork_rng(devices=[]):
            for v in range(1, self.views):
                torch.default_generator.manual_seed(zlib.crc32(f"{key}#{v}".encode()))
                out.append(self.augment(image))
        return torch.stack(out)


class ImageFiles(Dataset):
    """Images of one split; yields (views [V, 3, R, R], error message or "")."""

    def __init__(self, folder: Path, paths: list[str], views: Views):
        self.folder, self.paths, self.views = folder, paths, views

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.folder / self.paths[i]
        try:
            with Image.open(path) as f:
                image = to_rgb(f)
        except (OSError, ValueError) as e:
            # reported by the main process with the file's name, instead of a worker's traceback
            shape = (self.views.views, 3, *self.views.size)
            return torch.zeros(shape), f"cannot read image {path}: {e}"
        return self.views(image, self.paths[i]), ""


def check_images(folder: Path, paths: list[str]):
    """Open every image's header (no decoding) before anything is loaded or encoded; one line for all bad ones.

    A missing file, a folder, an empty or a non-image file fails here, all of them reported at once, instead
    of one by one after minutes of encoding. A file cut short after its header passes and still fails at
    decoding, with its name.
    """
    def problem(rel: str) -> str:
        try:
            with Image.open(folder / rel) as image:
                return "" if image.width and image.height else f"{folder / rel} (0 pixels)"
        except FileNotFoundError:
            return f"{folder / rel} (missing)"
        except UnidentifiedImageError:
            return f"{folder / rel} (not an image)"
        except Exception as e:
            return f"{folder / rel} ({type(e).__name__})"
    # threads overlap the waits on a slow (network) file system; chunks keep the pool's overhead off a fast one
    chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        bad = [p for found in pool.map(lambda chunk: [problem(p) for p in chunk], chunks) for p in found if p]
    if bad:
        raise DataError(f"{len(bad)} of {len(paths)} images cannot be read, e.g. {'; '.join(bad[:3])}; replace "
                        f"them or remove them from the split ({LAYOUT_HINT})")


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


@torch.no_grad()
def encode_images(model, files: ImageFiles, batch_size: int, workers: int, device: torch.device,
                  desc: str) -> torch.Tensor:
    """[V, N, d] L2-normalised float16 image features; `batch_size` counts forward passes (views)."""
    views = files.views.views
    loader = DataLoader(files, batch_size=max(1, batch_size // views), num_workers=workers,
                        pin_memory=device.type == "cuda")
    chunks = []
    with tqdm(total=len(files) * views, desc=desc, unit="img", disable=None) as bar:  # a bar on a terminal only
        for x, errors in loader:
            if any(errors):
                raise DataError(f"{next(e for e in errors if e)}; replace the file or remove it from the split")
            with _autocast(device):
                f = model.encode_image(x.to(device, non_blocking=True).flatten(0, 1))  # [B*V, d]
            chunks.append(F.normalize(f.float(), dim=-1).unflatten(0, (-1, views)).half().cpu())
            bar.update(f.shape[0])
    return torch.cat(chunks).transpose(0, 1).contiguous()


@torch.no_grad()
def encode_text(encoder: backbones.Encoder, prompts: list[list[str]], batch_size: int,
                device: torch.device) -> torch.Tensor:
    """[C, d] class features: the renormalised mean of each class's normalised prompt embeddings, float16.
    Sentences longer than the model's context are cut (the end-of-text token kept), as clip.tokenize(truncate)."""
    tokens = encoder.tokenize([s for p in prompts for s in p])                  # [S, context_length]
    with _autocast(device):
        emb = torch.cat([F.normalize(encoder.model.encode_text(t.to(device)).float(), dim=-1)
                         for t in tokens.split(batch_size)])                    # [S, d]
    means = torch.stack([e.mean(0) for e in emb.split([len(p) for p in prompts])])  # [C, d]
    return F.normalize(means, dim=-1).half().cpu()


# ----------------------------------------------------------------------------- the flags

def _fills_in_a_name(template: str) -> bool:
    """True if template.format(name) puts the name in and asks for nothing else ("{} texture.")."""
    try:
        return "\0" in template.format("\0")
    except (IndexError, KeyError, ValueError):  # "{} {}", "{name}", "{"
        return False


def check_flags(settings: Settings, batch_size: int, workers):
    """One clear line for the first setting out of its range (cli.RANGES, the table the flags are parsed with),
    before anything is read, loaded or encoded: for a caller of extract_features() as for the command line."""
    numbers = [("max_shots", settings.max_shots), ("views", settings.views), ("encode_batch_size", batch_size),
               *(("seeds", seed) for seed in settings.seeds), *([("workers", workers)] if workers is not None else [])]
    problems = [
        (not settings.seeds, "--seeds must list at least one seed"),
        *((not RANGES[name].holds(value), f"--{name.replace('_', '-')} must be {RANGES[name].describe()}, not {value}")
          for name, value in numbers),
        (not _fills_in_a_name(settings.negative_template),
         f"--negative-template must contain {{}} where the class name goes, e.g. 'a photo of no {{}}.', "
         f"not {settings.negative_template!r}"),
        (settings.template is not None and not _fills_in_a_name(settings.template),
         f"--template must contain {{}} where the class name goes, e.g. 'a photo of a {{}}, a type of bird.', "
         f"not {settings.template!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise DataError(message)


# ----------------------------------------------------------------------------- the whole job

def plan_encoding(splits: Splits, seeds: list[int], max_shots: int, views: int, allow_repeats: bool):
    """What to encode, {split: ((path, label) items, views)}, and the few-shot subsets as rows into them:
    {"fewshot": {seed: [C, max_shots]}, "val_fewshot": {seed: [C, min(max_shots, 4)]}} (those that exist)."""
    jobs, subsets = {"test": (splits.test, 1)}, {}
    labels = lambda items: [y for _, y in items]
    if splits.train:
        rows, subsets["fewshot"] = fewshot_rows(labels(splits.train), splits.classnames, max_shots, seeds,
                                                allow_repeats, "training")
        jobs["train"] = ([splits.train[i] for i in rows], views)
    if splits.val:
        rows, subsets["val_fewshot"] = fewshot_rows(labels(splits.val), splits.classnames,
                                                    min(max_shots, VAL_SHOTS), seeds, allow_repeats, "validation")
        jobs["val"] = ([splits.val[i] for i in rows], 1)
    return jobs, subsets


def encode_splits(encoder: backbones.Encoder, folder: Path, jobs: dict, batch_size: int, workers: int,
                  device: torch.device, dataset: str) -> dict:
    """{split: {"features": [V, N, d] for train, [M, d] otherwise, "labels"}, "paths": {split: [path]}}."""
    out, n_forward, seconds = {"paths": {}}, 0, 0.0
    for split, (items, views) in jobs.items():
        paths, labels = [p for p, _ in items], [y for _, y in items]
        files = ImageFiles(folder, paths, Views(encoder.transform, encoder.preprocess, views))
        start = time.perf_counter()
        features = encode_images(encoder.model, files, batch_size, workers, device, f"{dataset} {split}")
        seconds += time.perf_counter() - start
        n_forward += len(paths) * views
        out[split] = {"features": features if split == "train" else features[0],
                      "labels": torch.tensor(labels, dtype=torch.long)}
        out["paths"][split] = paths
    print(f"encoded {n_forward} images (training views counted) in {seconds:.1f} s, "
          f"{n_forward / max(seconds, 1e-9):.1f} images/s on {device}")
    return out


def prompts_for(settings: Settings, classnames: list[str]):
    """The positive and negative sentences of each class, and the settings with their hash filled in."""
    template = settings.template or dataset_template(settings.dataset)
    source = cupl_prompts(settings.dataset) if settings.prompts == CUPL else settings.prompts
    positive = load_prompts(source, classnames, template) if source else [[template.format(c)] for c in classnames]
    negative = [[settings.negative_template.format(c)] for c in classnames]
    digest = hashlib.sha256(json.dumps([positive, negative]).encode()).hexdigest()
    return positive, negative, dataclasses.replace(settings, prompts_sha256=digest)


def encode_dataset(settings: Settings, splits: Splits, prompts, batch_size: int, workers: int,
                   device: torch.device) -> dict:
    """Everything a features file holds, encoded with the settings' CLIP. prompts: (positive, negative)."""
    jobs, subsets = plan_encoding(splits, list(settings.seeds), settings.max_shots, settings.views,
                                  settings.allow_repeats)
    check_images(splits.images, [p for items, _ in jobs.values() for p, _ in items])  # before CLIP loads
    encoder = backbones.load(settings, device)
    positive, negative = prompts
    name = dataset_name(settings.dataset)
    out = {"format": FORMAT, "dataset": name, "backbone": settings.name,
           "classnames": splits.classnames, "logit_scale": encoder.model.logit_scale.exp().item(),
           "prompts": {"positive": positive, "negative": negative},
           "text": {"positive": encode_text(encoder, positive, batch_size, device),
                    "negative": encode_text(encoder, negative, batch_size, device)},
           **encode_splits(encoder, splits.images, jobs, batch_size, workers, device, name),
           **subsets, "settings": settings.record()}
    if splits.class_map is not None:
        out["class_map"] = torch.tensor(splits.class_map, dtype=torch.long)
    if is_folder(settings.dataset):  # the split made for it: kept, it reproduces the file (as split.json)
        out["split"] = splits.coop_split()
    return out


def serve_without_dataset(path: Path, settings: Settings, folder: Path) -> Path:
    """train.py on a features file whose dataset folder is absent: the file serves only if it was made as
    asked (with the file's own class names, the prompts asked for are rebuilt and compared)."""
    old = existing(path)
    if "settings" not in old:  # written by another tool: no extraction flag ever applied to it
        print(f"note: {folder} is absent and {path} records no extraction settings, so it is used as it is")
        return path
    _, _, settings = prompts_for(settings, list(old.get("classnames", [])))
    check_served(path, old["settings"], settings.record(), absent=folder)
    return path


def extract_features(settings: Settings, root, out_dir="features", *, batch_size: int = 256,
                     workers: int | None = None, device=None, overwrite: bool = False, download: bool = False) -> Path:
    """Encode `settings.dataset` (under `root`, or a folder of its own) with CLIP and write one features file;
    returns its path. download: fetch a benchmark dataset into `root` first if it is not there.

    An existing file is reused when it was made with the settings asked for (or more seeds / max-shots), also
    when the dataset folder is absent, and refused otherwise unless `overwrite`. Processes writing the same
    file take turns (file_lock): the second reuses or refuses what the first wrote.
    """
    settings = dataclasses.replace(settings, dataset=resolve_dataset(settings.dataset),
                                   seeds=tuple(dict.fromkeys(int(s) for s in settings.seeds)))
    check_flags(settings, batch_size, workers)
    device = resolve_device(device)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    settings = backbones.resolve(settings)  # the model as the file records it: its name is in the file's name
    path = features_path(out_dir, settings.dataset, settings.name)
    if not is_folder(settings.dataset) and dataset_spec(settings.dataset).layout == "shift":
        settings = settings.test_only()
    folder = dataset_folder(settings.dataset, root)
    if download and is_folder(settings.dataset):
        raise DataError(f"--download fetches the benchmark datasets, and {folder} is a folder of your own; drop "
                        f"--download")
    if not folder.exists() and path.exists() and not overwrite:
        try:
            return serve_without_dataset(path, settings, folder)
        except DataError:
            if not download:  # else the dataset is fetched, and the file compared again below
                raise
    if download:
        download_dataset(settings.dataset, root)

    splits = load_splits(settings.dataset, root)
    if is_folder(settings.dataset):  # a folder's split is made from its files: compared on reuse
        settings = dataclasses.replace(settings, split_sha256=splits.sha256())
    positive, negative, settings = prompts_for(settings, splits.classnames)
    if reusable(path, settings.record(), overwrite):  # reading needs no lock (a shared folder may be read-only)
        return path
    # held from the check to the write: a second process waits, then reuses or refuses what this one wrote
    with acquire(file_lock(path), path):
        if reusable(path, settings.record(), overwrite):  # another process wrote it while this one waited
            return path
        out = encode_dataset(settings, splits, (positive, negative), batch_size, workers, device)
        write_atomic(path, lambda f: torch.save(out, f))
    print(f"wrote {path}")
    return path


def prompts_arg(text: str):
    """argparse type of --prompts: "cupl" (CuPL's descriptions, downloaded) or a json file's path."""
    return CUPL if text == CUPL else path_arg(text)


def add_extraction_args(parser):
    """The extraction flags, declared once for every command that may extract (this script, train.py,
    bench/reproduce.py), so that an error naming one of them names a flag of the command that was run."""
    g = parser.add_argument_group("feature extraction (when the features file does not exist yet)")
    g.add_argument("--root", type=path_arg, default=Path("data"),
                   help="folder holding the dataset folders in CoOp's layout (default data/)")
    g.add_argument("--download", action="store_true", help="first download the dataset into --root if it is not "
                   "there: its images from their official location and CoOp's split file, each checked "
                   "(docs/datasets.md); for ImageNet, Stanford Cars and the shift sets, print the steps to take")
    g.add_argument("--backbone", help="the CLIP (docs/backbones.md): one of OpenAI's names (RN50, RN101, "
                   "ViT-B/32, ViT-B/16, ViT-L/14, ...) for OpenAI's weights, an open_clip model name with "
                   "--pretrained, hf-hub:ORG/REPO or local-dir:FOLDER; its name is in the features file's name "
                   "(default RN50, or with --clip-checkpoint the architecture read from its weights)")
    g.add_argument("--pretrained", help="the weights of an open_clip --backbone: a tag (e.g. laion2b_s34b_b88k; "
                   "default openai for OpenAI's names) or a weights file")
    g.add_argument("--features-dir", type=path_arg, default=Path("features"),
                   help="where features files are written and looked up (default features/)")
    g.add_argument("--clip-checkpoint", type=path_arg, help="a local OpenAI-format CLIP checkpoint (a state dict or "
                   "TorchScript file, as clip.load caches them) instead of downloading weights; named from its "
                   "weights")
    g.add_argument("--prompts", type=prompts_arg, help="positive prompts instead of the dataset's template: "
                   "'cupl' (CuPL's class descriptions, downloaded once into ~/.cache/hegraphadapter) or a json "
                   "file {classname: [sentence, ...]}; a class without sentences keeps the template")
    g.add_argument("--template", help="template of the positive prompts, e.g. 'a photo of a {}, a type of bird.' "
                   "(default: the dataset's, CoOp's; 'a photo of a {}.' for a folder of your own)")
    g.add_argument("--negative-template", default="a photo of no {}.",
                   help="template of the negative prompts (default 'a photo of no {}.')")
    g.add_argument("--seeds", type=number_arg("seeds", int), nargs="+", default=[1, 2, 3],
                   help="few-shot seeds (default 1 2 3)")
    g.add_argument("--max-shots", type=number_arg("max_shots", int), default=16,
                   help="training images per class sampled per seed; K shots are the first K (default 16)")
    g.add_argument("--views", type=number_arg("views", int), default=10,
                   help="views per training image: CLIP's preprocessing + augmented crops (default 10)")
    g.add_argument("--encode-batch-size", type=number_arg("encode_batch_size", int), default=256,
                   help="images (views) per CLIP forward pass (default 256)")
    g.add_argument("--workers", type=number_arg("workers", int),
                   help="data loading processes (default: CPU count, at most 8)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--allow-repeats", action="store_true",
                   help="let a class with fewer images than --max-shots repeat its images instead of failing")
    g.add_argument("--overwrite", action="store_true", help="replace an existing features file made with "
                   "other settings (train.py: also another run's checkpoints in --save)")
    return g


def settings_from_args(args, dataset: str) -> Settings:
    """The Settings that the extraction flags of add_extraction_args ask for, for `dataset` (not resolved)."""
    return Settings(dataset=dataset, backbone=args.backbone, pretrained=args.pretrained,
                    clip_checkpoint=str(args.clip_checkpoint.resolve()) if args.clip_checkpoint else None,
                    prompts=None if args.prompts is None else str(args.prompts), template=args.template,
                    negative_template=args.negative_template, seeds=tuple(args.seeds), max_shots=args.max_shots,
                    views=args.views, allow_repeats=args.allow_repeats)


def backbone_name(args) -> str:
    """The name of the CLIP the extraction flags ask for, as features files and results show it."""
    return backbones.resolve(settings_from_args(args, "")).name


def extract_from_args(args, dataset: str, like: dict | None = None) -> Path:
    """extract_features with the flags of add_extraction_args. like: a features file's dict, whose CLIP is used
    instead of the one the flags name (its recorded model, or for a file without settings its backbone's name)."""
    settings = settings_from_args(args, dataset)
    if like is not None:
        made = like.get("settings") if isinstance(like.get("settings"), dict) else {}
        settings = dataclasses.replace(settings, backbone=made.get("backbone", like.get("backbone")),
                                       pretrained=made.get("pretrained"), clip_checkpoint=made.get("clip_checkpoint"))
    return extract_features(settings, args.root, args.features_dir, batch_size=args.encode_batch_size,
                            workers=args.workers, device=args.device, overwrite=args.overwrite,
                            download=args.download)


def main(argv=None):
    p = Parser(prog="extract_features.py", description="Extract frozen CLIP features of a few-shot dataset into "
               "one file (its layout: docs/features-file.md).")
    p.add_argument("--dataset", required=True, type=dataset_arg, help="a dataset key (e.g. dtd; docs/datasets.md "
                   "lists them) or a folder holding one subfolder of images per class")
    add_extraction_args(p)
    args = p.parse_args(argv)
    guarded("extract_features.py", lambda: extract_from_args(args, args.dataset))


if __name__ == "__main__":
    main()
