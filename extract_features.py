"""Extract frozen CLIP features for HeGraphAdapter into one file.

    python extract_features.py --dataset dtd --root DATA --backbone RN50 --features-dir features/

The datasets (CoOp's layouts, split files, templates and few-shot protocol) and the prompts are read by
fewshot_data.py; the augmented training views are Tip-Adapter's (Zhang et al., 2022). The file written
here is the contract with train.py; its layout is documented in README.md:

    format "hegraphadapter-features-v1", dataset, backbone, logit_scale, classnames [C], prompts,
    text {positive [C, d], negative [C, d]},
    train {features [V, N, d], labels [N]}, val / test {features [M, d], labels [M]},
    fewshot {seed: [C, max_shots] rows of train}, val_fewshot {seed: [C, min(max_shots, 4)] rows of val},
    plus class_map [C] (ImageNet shift sets), settings and paths.

All features are L2-normalised float16. Only the images some seed needs are encoded, plus the test split.
"""
import argparse
import glob
import hashlib
import http.client
import json
import os
import pickle
import re
import socket
import sys
import time
import urllib.request
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fewshot_data import (CUPL, CUPL_PROMPTS, DATASETS, LAYOUT_HINT, VAL_SHOTS, DataError, Splits,
                          dataset_spec, fewshot_rows, load_prompts, load_splits)

FORMAT = "hegraphadapter-features-v1"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    """One decoded image -> [V, 3, R, R]: view 0 is CLIP's own preprocessing, the others Tip-Adapter's augmentation."""

    def __init__(self, preprocess, resolution: int, views: int):
        import torchvision.transforms as T  # here: train.py imports this module and never augments (1.5 s saved)
        self.preprocess, self.resolution, self.views = preprocess, resolution, views
        self.augment = T.Compose([
            T.RandomResizedCrop(resolution, scale=(0.5, 1), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ])

    def __call__(self, image: Image.Image, key: str) -> torch.Tensor:
        out = [self.preprocess(image)]
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
            shape = (self.views.views, 3, self.views.resolution, self.views.resolution)
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
        except Exception as e:  # noqa: BLE001 - IsADirectoryError, PermissionError, DecompressionBombError, ...
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
    with tqdm(total=len(files) * views, desc=desc, unit="img") as bar:
        for x, errors in loader:
            if any(errors):
                raise DataError(f"{next(e for e in errors if e)}; replace the file or remove it from the split")
            with _autocast(device):
                f = model.encode_image(x.to(device, non_blocking=True).flatten(0, 1))  # [B*V, d]
            chunks.append(F.normalize(f.float(), dim=-1).unflatten(0, (-1, views)).half().cpu())
            bar.update(f.shape[0])
    return torch.cat(chunks).transpose(0, 1).contiguous()


@torch.no_grad()
def encode_text(model, prompts: list[list[str]], batch_size: int, device: torch.device) -> torch.Tensor:
    """[C, d] class features: the renormalised mean of each class's normalised prompt embeddings, float16."""
    tokens = import_clip().tokenize([s for p in prompts for s in p], truncate=True)
    with _autocast(device):
        emb = torch.cat([F.normalize(model.encode_text(t.to(device)).float(), dim=-1)
                         for t in tokens.split(batch_size)])
    means = torch.stack([e.mean(0) for e in emb.split([len(p) for p in prompts])])
    return F.normalize(means, dim=-1).half().cpu()


def load_torch_file(path, what: str, mmap: bool = False):
    """torch.load(path) on the CPU with weights_only=True, or one DataError line naming `what` and `path`.

    For any file a user hands over (a features file, a checkpoint): a missing path, an empty or truncated
    file, or one torch.save did not write (text, an image, a plain pickle) each end in one line, e.g.
    "checkpoint runs/seed1.pt is truncated or not a file written by torch.save (...)", not a traceback.
    mmap=True maps the tensors instead of reading them (for files in torch.save's default zip format; others
    are read), so a large file's small entries are cheap to look at.

        data = load_torch_file(args.features, "features file")
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist" + (" as a file (it is a folder)" if path.is_dir() else ""))
    is_zip = zipfile.is_zipfile(path)  # torch.save's format since torch 1.6; False for a truncated one
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as e:  # noqa: BLE001 - torch raises EOFError, KeyError, RuntimeError, UnpicklingError, ...
        first = str(e).strip().split("\n")[0].split(". ")[0]  # torch's messages go on for lines
        reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
        if is_zip and isinstance(e, pickle.UnpicklingError):
            raise DataError(f"{what} {path} holds objects other than tensors and plain Python containers, "
                            f"which are not loaded (torch.load weights_only=True; {reason})") from None
        raise DataError(f"{what} {path} is truncated or not a file written by torch.save ({reason})") from None


def import_clip():
    """The clip package, imported on first use: it imports torchvision, which train.py does not need."""
    with warnings.catch_warnings():  # clip.py imports pkg_resources, deprecated but harmless with setuptools<81
        warnings.simplefilter("ignore", UserWarning)
        import clip
    return clip


def load_clip(backbone: str, clip_checkpoint, device: torch.device):
    """OpenAI CLIP from a local checkpoint if given, else by name (downloaded once by the clip package)."""
    source = str(clip_checkpoint) if clip_checkpoint else backbone
    try:
        with warnings.catch_warnings():  # clip.load first tries torch.jit.load, deprecated, on every file
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)  # and torch.load warns before refusing a plain pickle
            model, preprocess = import_clip().load(source, device=device)
    except Exception as e:  # noqa: BLE001 - whatever torch.jit.load, torch.load or clip's state-dict reader raise
        if not clip_checkpoint:
            raise DataError(f"cannot load CLIP '{backbone}': {e}; pass --clip-checkpoint PATH to a local "
                            f"OpenAI CLIP checkpoint") from None
        load_torch_file(clip_checkpoint, "--clip-checkpoint")  # one line if it is no torch file at all
        raise DataError(f"--clip-checkpoint {clip_checkpoint} is a torch file but not an OpenAI CLIP checkpoint "
                        f"(a state dict or TorchScript archive as clip.load reads; {type(e).__name__}: {e})") from None
    return model.eval(), preprocess


# ----------------------------------------------------------------------------- the flags

def _fills_in_a_name(template: str) -> bool:
    """True if template.format(name) puts the name in and asks for nothing else ("{} texture.")."""
    try:
        return "\0" in template.format("\0")
    except (IndexError, KeyError, ValueError):  # "{} {}", "{name}", "{"
        return False


def check_flags(seeds, max_shots: int, views: int, batch_size: int, workers, negative_template: str):
    """One clear line for the first flag out of its range, before anything is read, loaded or encoded."""
    problems = [
        (not seeds, "--seeds must list at least one seed"),
        (max_shots < 1, f"--max-shots must be at least 1, not {max_shots}"),
        (views < 1, f"--views must be at least 1 (view 0 is CLIP's own preprocessing), not {views}"),
        (batch_size < 1, f"--encode-batch-size must be at least 1, not {batch_size}"),
        (workers is not None and workers < 0,
         f"--workers must be 0 (load the images in the main process) or more, not {workers}"),
        (not _fills_in_a_name(negative_template),
         f"--negative-template must contain {{}} where the class name goes, e.g. 'a photo of no {{}}.', "
         f"not {negative_template!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise DataError(message)


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


# ----------------------------------------------------------------------------- the whole job

def features_path(out_dir, dataset: str, backbone: str) -> Path:
    """The file the script writes, e.g. features/dtd_RN50.pt (ViT-B/32 -> ViT-B-32)."""
    return Path(out_dir) / f"{dataset}_{re.sub(r'[^A-Za-z0-9_.-]', '-', backbone)}.pt"


def plan_encoding(splits: Splits, seeds: list[int], max_shots: int, views: int, allow_repeats: bool):
    """What to encode, {split: ((path, label) items, views)}, and the few-shot subsets as rows into them:
    {"fewshot": {seed: [C, max_shots]}, "val_fewshot": {seed: [C, min(max_shots, 4)]}} (those that exist)."""
    jobs, subsets = {"test": (splits.test, 1)}, {}
    labels = lambda items: [y for _, y in items]  # noqa: E731
    if splits.train:
        rows, subsets["fewshot"] = fewshot_rows(labels(splits.train), splits.classnames, max_shots, seeds,
                                                allow_repeats, "training")
        jobs["train"] = ([splits.train[i] for i in rows], views)
    if splits.val:
        rows, subsets["val_fewshot"] = fewshot_rows(labels(splits.val), splits.classnames,
                                                    min(max_shots, VAL_SHOTS), seeds, allow_repeats, "validation")
        jobs["val"] = ([splits.val[i] for i in rows], 1)
    return jobs, subsets


def encode_splits(model, preprocess, folder: Path, jobs: dict, batch_size: int, workers: int,
                  device: torch.device, dataset: str) -> dict:
    """{split: {"features": [V, N, d] for train, [M, d] otherwise, "labels"}, "paths": {split: [path]}}."""
    out, n_forward, seconds = {"paths": {}}, 0, 0.0
    for split, (items, views) in jobs.items():
        paths, labels = [p for p, _ in items], [y for _, y in items]
        files = ImageFiles(folder, paths, Views(preprocess, model.visual.input_resolution, views))
        start = time.perf_counter()
        features = encode_images(model, files, batch_size, workers, device, f"{dataset} {split}")
        seconds += time.perf_counter() - start
        n_forward += len(paths) * views
        out[split] = {"features": features if split == "train" else features[0],
                      "labels": torch.tensor(labels, dtype=torch.long)}
        out["paths"][split] = paths
    print(f"encoded {n_forward} images (training views counted) in {seconds:.1f} s, "
          f"{n_forward / max(seconds, 1e-9):.1f} images/s on {device}")
    return out


def _existing(path: Path) -> dict:
    """The dict in the features file at `path`, its tensors mapped rather than read; one line if it is none."""
    try:
        data = load_torch_file(path, "features file", mmap=True)
    except DataError as e:
        raise DataError(f"{e}; pass --overwrite to replace it or choose another --features-dir") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} exists and is not a features file; pass --overwrite to replace it or choose "
                        f"another --features-dir")
    return data


def _check_served(path: Path, recorded, settings: dict, absent: Path | None = None):
    """Return if the file at `path`, made with the `recorded` settings, serves `settings`; else one line why not.

    A file made with more seeds or more max-shots than asked serves too: the subsets of a seed do not
    depend on the other seeds, and K shots are the first K columns of any larger max-shots. `absent`: the
    dataset folder, when it is absent (then the file cannot be extracted again).
    """
    if not isinstance(recorded, dict):
        raise DataError(f"{path} exists and is not a features file written by this script; pass --overwrite "
                        f"to replace it or choose another --features-dir")
    shown = lambda k, v: str(v)[:12] if k.endswith("sha256") else v  # noqa: E731
    differ = [f"{k}: {shown(k, recorded.get(k))!r} in the file, {shown(k, v)!r} asked" for k, v in settings.items()
              if k not in ("seeds", "max_shots") and recorded.get(k) != v]
    old_seeds, old_shots = recorded.get("seeds", []), recorded.get("max_shots", 0)
    if not set(settings["seeds"]) <= set(old_seeds) or settings["max_shots"] > old_shots:
        differ.append(f"seeds {old_seeds} and max-shots {old_shots} in the file, seeds {settings['seeds']} and "
                      f"max-shots {settings['max_shots']} asked")
    if not differ:
        print(f"reusing {path}: it was extracted with the same settings"
              + (f" (the dataset folder {absent} is absent)" if absent else ""))
        return
    if absent:
        raise DataError(f"{path} was extracted with other settings ({'; '.join(differ)}) and the dataset folder "
                        f"{absent} is absent, so it cannot be extracted again: ask for the file's settings or put "
                        f"the dataset under --root")
    if len(differ) == 1 and differ[0].startswith("seeds"):  # most likely per-seed jobs sharing one file
        seeds = " ".join(map(str, sorted(set(old_seeds) | set(settings["seeds"]))))
        raise DataError(f"{path} exists with {differ[0]}: extract it once for all the seeds before starting "
                        f"per-seed jobs (python extract_features.py --dataset {settings['dataset']} --seeds {seeds} "
                        f"--max-shots {max(old_shots, settings['max_shots'])} and the same other flags), or pass "
                        f"--overwrite to replace it")
    raise DataError(f"{path} exists with different settings ({'; '.join(differ)}); pass --overwrite to replace it "
                    f"or choose another --features-dir")


def _reuse(path: Path, settings: dict, overwrite: bool) -> bool:
    """True if the file at `path` serves `settings`, False if there is none (or overwrite); else one line why not."""
    if overwrite or not path.exists():
        return False
    _check_served(path, _existing(path).get("settings"), settings)
    return True


def file_lock(path) -> FileLock:
    """An exclusive lock on `path` across processes, held in a hidden `.<name>.lock` file beside it.

    `with file_lock(path): check, then write` makes parallel jobs on one file (one per seed or per GPU on a
    cluster) take turns, so that none replaces a file another has just checked or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(f".{path.name}.lock"))


def _acquire(lock: FileLock, path: Path):
    """lock.acquire() for a `with`, saying what it waits for when another process holds the lock."""
    try:
        return lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process to finish writing {path}", flush=True)
        return lock.acquire()


STALE_TEMP_SECONDS = 24 * 3600  # a writer keeps writing its temporary file: one untouched for a day is dead


def _alive(pid: int) -> bool:
    """True if process `pid` of this host runs (or might: when it cannot be asked)."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temps(path: Path):
    """Delete the temporary files that killed writes of `path` left (kill -9, power cut: no `finally` ran).

    Only files of write_atomic's naming, .NAME.HOST.PID.tmp, and only a dead writer's: a process of this host
    that no longer runs, or any file untouched for a day (the PID since reused, another host writing to a
    shared folder). A live writer's file is never removed.
    """
    host, named = socket.gethostname(), re.compile(rf"\.{re.escape(path.name)}\.(?:(.+)\.)?(\d+)\.tmp")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = named.fullmatch(tmp.name)
        try:
            if match and ((match[1] == host and not _alive(int(match[2])))
                          or time.time() - tmp.stat().st_mtime > STALE_TEMP_SECONDS):
                tmp.unlink()
        except FileNotFoundError:  # another process cleaned it up first
            pass


def write_atomic(path, write):
    """write(file) into a temporary file beside `path`, then rename it: `path` is complete or untouched.

    The temporary file is .NAME.HOST.PID.tmp; those of earlier writes that were killed are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # a file object, not a name: torch.save would store the temporary name
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_dir() -> Path:
    """Where downloads are kept: $XDG_CACHE_HOME/hegraphadapter, else ~/.cache/hegraphadapter (as clip keeps
    its weights in ~/.cache/clip)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hegraphadapter"


def cupl_prompts(dataset: str) -> Path:
    """The CuPL descriptions of `dataset`, downloaded once from CUPL_PROMPTS into cache_dir(); the file's sha256
    is checked before every use, so a download that is cut short or altered is never used."""
    if dataset not in CUPL_PROMPTS:
        raise DataError(f"--prompts cupl: no CuPL descriptions are pinned for '{dataset}' (there are for "
                        f"{', '.join(CUPL_PROMPTS)}); pass --prompts FILE.json of {{classname: [sentence, ...]}}")
    url, sha256 = CUPL_PROMPTS[dataset]
    path = cache_dir() / url.rsplit("/", 1)[-1]
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path
    print(f"downloading the CuPL prompts of {dataset} from {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:  # no network, HTTP errors, a connection cut short
        raise DataError(f"--prompts cupl: cannot download {url} ({e}); download it by hand and pass "
                        f"--prompts FILE") from None
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise DataError(f"--prompts cupl: {url} has sha256 {found}, not the pinned {sha256} (a broken download, "
                        f"or the file changed); nothing was cached or used")
    write_atomic(path, lambda f: f.write(data))
    return path


def extract_features(dataset: str, root, out_dir="features", backbone: str = "RN50", clip_checkpoint=None,
                     prompts=None, negative_template: str = "a photo of no {}.", seeds=(1, 2, 3),
                     max_shots: int = 16, views: int = 10, batch_size: int = 256, workers: int | None = None,
                     device=None, allow_repeats: bool = False, overwrite: bool = False) -> Path:
    """Encode `dataset` under `root` with CLIP and write one features file; returns its path.

    An existing file is reused when it was made with the settings asked for (or more seeds / max-shots), also
    when the dataset folder is absent, and refused otherwise unless `overwrite`. Processes writing the same
    file take turns (file_lock): the second reuses or refuses what the first wrote.
    """
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    check_flags(seeds, max_shots, views, batch_size, workers, negative_template)
    device = resolve_device(device)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    path = features_path(out_dir, dataset, backbone)
    test_only = dataset_spec(dataset).layout == "shift"

    def settings_for(names: list[str]):
        """The positive and negative prompts of the classes, and the settings a file records and is compared by."""
        template = DATASETS[dataset].template
        source = cupl_prompts(dataset) if prompts == CUPL else prompts
        positive = load_prompts(source, names, template) if source else [[template.format(c)] for c in names]
        negative = [[negative_template.format(c)] for c in names]
        return positive, negative, {
            "format": FORMAT, "dataset": dataset, "backbone": backbone,
            "clip_checkpoint": str(Path(clip_checkpoint).resolve()) if clip_checkpoint else None,
            # "templates", "cupl" or the file's name; the sentences themselves are compared by their hash
            "prompts": CUPL if prompts == CUPL else Path(prompts).name if prompts else "templates",
            "prompts_sha256": hashlib.sha256(json.dumps([positive, negative]).encode()).hexdigest(),
            "negative_template": negative_template,
            # a test-only set (ImageNet shift set) has no few-shot subsets and no training views: the main
            # run's --seeds, --max-shots, --views and --allow-repeats mean nothing for it
            **({"seeds": [], "max_shots": 0} if test_only else
               {"seeds": seeds, "max_shots": max_shots, "views": views, "allow_repeats": allow_repeats}),
        }

    folder = Path(root) / dataset_spec(dataset).folder
    if not folder.exists() and path.exists() and not overwrite:
        # nothing to extract from (train.py on features alone): the file serves only if it was made as asked
        old = _existing(path)
        if "settings" not in old:  # written by another tool: no extraction flag ever applied to it
            print(f"note: {folder} is absent and {path} records no extraction settings, so it is used as it is")
            return path
        _check_served(path, old["settings"], settings_for(list(old.get("classnames", [])))[2], absent=folder)
        return path

    splits = load_splits(dataset, root)
    names = splits.classnames
    positive, negative, settings = settings_for(names)
    if _reuse(path, settings, overwrite):  # reading needs no lock (a shared features folder may be read-only)
        return path
    # held from the check to the write: a second process waits, then reuses or refuses what this one wrote
    with _acquire(file_lock(path), path):
        if _reuse(path, settings, overwrite):  # another process wrote it while this one waited
            return path
        jobs, subsets = plan_encoding(splits, seeds, max_shots, views, allow_repeats)
        check_images(splits.images, [p for items, _ in jobs.values() for p, _ in items])  # before CLIP loads
        model, preprocess = load_clip(backbone, clip_checkpoint, device)
        out = {"format": FORMAT, "dataset": dataset, "backbone": backbone, "classnames": names,
               "logit_scale": model.logit_scale.exp().item(),
               "prompts": {"positive": positive, "negative": negative},
               "text": {"positive": encode_text(model, positive, batch_size, device),
                        "negative": encode_text(model, negative, batch_size, device)},
               **encode_splits(model, preprocess, splits.images, jobs, batch_size, workers, device, dataset),
               **subsets, "settings": settings}
        if splits.class_map is not None:
            out["class_map"] = torch.tensor(splits.class_map, dtype=torch.long)
        write_atomic(path, lambda f: torch.save(out, f))
    print(f"wrote {path}")
    return path


def path_arg(text: str) -> Path:
    """argparse type of every path flag: ~ is expanded, in "--flag ~/x" and "--flag=~/x" alike."""
    return Path(text).expanduser()


def prompts_arg(text: str):
    """argparse type of --prompts: "cupl" (CuPL's descriptions, downloaded) or a json file's path."""
    return CUPL if text == CUPL else path_arg(text)


def add_extraction_args(parser):
    """The extraction flags, declared once for every command that may extract (this script, train.py,
    bench/reproduce.py), so that an error naming one of them names a flag of the command that was run."""
    g = parser.add_argument_group("feature extraction (when the features file does not exist yet)")
    g.add_argument("--root", type=path_arg, default=Path("data"),
                   help="folder holding the dataset folders in CoOp's layout (default data/)")
    g.add_argument("--backbone", default="RN50", help="CLIP model name, also used in the file name (default RN50)")
    g.add_argument("--features-dir", type=path_arg, default=Path("features"),
                   help="where features files are written and looked up (default features/)")
    g.add_argument("--clip-checkpoint", type=path_arg, help="local OpenAI CLIP checkpoint, loaded with "
                   "clip.load(PATH) instead of downloading --backbone")
    g.add_argument("--prompts", type=prompts_arg, help="positive prompts instead of the dataset's template: "
                   "'cupl' (CuPL's class descriptions, downloaded once into ~/.cache/hegraphadapter) or a json "
                   "file {classname: [sentence, ...]}; a class without sentences keeps the template")
    g.add_argument("--negative-template", default="a photo of no {}.",
                   help="template of the negative prompts (default 'a photo of no {}.')")
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="few-shot seeds (default 1 2 3)")
    g.add_argument("--max-shots", type=int, default=16,
                   help="training images per class sampled per seed; K shots are the first K (default 16)")
    g.add_argument("--views", type=int, default=10,
                   help="views per training image: CLIP's preprocessing + augmented crops (default 10)")
    g.add_argument("--encode-batch-size", type=int, default=256,
                   help="images (views) per CLIP forward pass (default 256)")
    g.add_argument("--workers", type=int, help="data loading processes (default: CPU count, at most 8)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--allow-repeats", action="store_true",
                   help="let a class with fewer images than --max-shots repeat its images instead of failing")
    g.add_argument("--overwrite", action="store_true", help="replace an existing features file made with "
                   "other settings (train.py: also another run's checkpoints in --save)")
    return g


def extract_from_args(args, dataset: str) -> Path:
    """extract_features with the flags of add_extraction_args."""
    return extract_features(dataset, args.root, args.features_dir, args.backbone, args.clip_checkpoint,
                            args.prompts, args.negative_template, args.seeds, args.max_shots, args.views,
                            args.encode_batch_size, args.workers, args.device, args.allow_repeats, args.overwrite)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line, not the whole usage. prog: the script's path."""

    def error(self, message):
        fail(f"{message} (python {self.prog} --help lists the options)")


def fail(message):
    """Exit non-zero with one clear line."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    p = Parser(prog="extract_features.py", description="Extract frozen CLIP features of a few-shot dataset into "
               "one file (layout in README.md).")
    p.add_argument("--dataset", required=True, choices=list(DATASETS), help="dataset key")
    add_extraction_args(p)
    a = p.parse_args(argv)
    try:
        extract_from_args(a, a.dataset)
    except DataError as e:
        fail(e)


if __name__ == "__main__":
    main()
