"""Frozen CLIP features of a few-shot dataset, extracted into one file (its contract: features.py).

The datasets (CoOp's layouts, split files, templates and few-shot protocol) are read by datasets.py, the prompts
by prompts.py, the CLIP is named and loaded by backbones.py; the augmented training views are Tip-Adapter's
(Zhang et al., 2022); what an existing file holds and lacks is cache.py's. Here: decoding the images, encoding
images and prompts with CLIP, and extract(), which writes the file, reuses it, or grows it by what it lacks. All
features are L2-normalised float16. Only the images some seed needs are encoded, plus the test split.
"""
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from fewshot import backbones, cache, files, pace, progress
from fewshot.datasets import (
    LAYOUT_HINT,
    Splits,
    dataset_folder,
    dataset_name,
    dataset_spec,
    dataset_template,
    is_folder,
    load_splits,
    prompt_name,
    resolve_dataset,
)
from fewshot.devices import resolve_device
from fewshot.download import cupl_prompts, download_dataset
from fewshot.errors import DataError
from fewshot.features import (
    AUTO,
    DEFAULT_MAX_SHOTS,
    FORMAT,
    PRECISIONS,
    Settings,
    existing,
    features_path,
    load_features,
)
from fewshot.prompts import CUPL, TEMPLATE_SETS, load_prompts
from fewshot.ranges import RANGES

# ----------------------------------------------------------------------------- encoding

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB.

    convert("RGB") clips the integer modes to 0..255, so a 16-bit image would come out almost white. They
    are scaled to 8 bits first, by the range their values are stored in: the 16-bit modes (I;16, I;16B, ...)
    and I (32-bit integers, which some decoders give for 16-bit PNG, TIFF or PGM files) as 0..65535 (/ 257),
    F (floats) as 0..1. An image whose values fall outside that range has no range to go by, so it is scaled
    by its own min..max. NaN or infinite pixels are taken as black (ImageFiles says so).
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image.convert("RGB")
    x = np.asarray(image, dtype=np.float64)                                    # [H, W]
    finite = np.isfinite(x)
    lo, hi = 0.0, 1.0 if image.mode == "F" else 65535.0
    if not finite.all():  # NaN or infinite pixels (a float TIFF) have no value: they are taken as black
        x = np.where(finite, x, min(lo, x[finite].min()) if finite.any() else lo)
    if x.size and (x.min() < lo or x.max() > hi):
        lo, hi = x.min(), (x.max() if x.max() > x.min() else x.min() + 1)  # a constant image: black
    gray = np.round((x - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)  # [H, W]
    return Image.fromarray(gray).convert("RGB")


class Views:
    """One decoded image -> [V, 3, H, W]: view 0 is the model's own eval transform, the others Tip-Adapter's
    augmentation (a random crop of 50-100% of the image, resized, and a random flip) at the model's input size,
    with its resampling, mean and std. first: the first view made (a file that holds an image's first views gets
    only the others: each view is seeded by itself)."""

    def __init__(self, transform, preprocess: backbones.Preprocess, views: int, first: int = 0):
        import torchvision.transforms as T  # here: training imports this module and never augments (1.5 s saved)
        self.transform, self.size, self.views, self.first = transform, preprocess.size, views, first
        resample = T.InterpolationMode.BILINEAR if preprocess.interpolation == "bilinear" else \
            T.InterpolationMode.BICUBIC
        self.augment = T.Compose([
            T.RandomResizedCrop(preprocess.size, scale=(0.5, 1), interpolation=resample),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(preprocess.mean, preprocess.std),
        ])

    def __call__(self, image: Image.Image, key: str) -> torch.Tensor:
        out = [self.transform(image)] if self.first == 0 else []
        # seed the CPU generator from the file and view only (restored afterwards): the same crops on
        # every run, machine and worker, so a second run writes the same file
        with torch.random.fork_rng(devices=[]):
            for v in range(max(1, self.first), self.first + self.views):
                torch.default_generator.manual_seed(zlib.crc32(os.fsencode(f"{key}#{v}")))  # a name's own bytes
                out.append(self.augment(image))
        return torch.stack(out)


class ImageFiles(Dataset):
    """Images of one split; yields (views [V, 3, R, R], error message or "", note or ""): a note is something the
    image holds that the user should hear of (NaN pixels), said once per split by encode_images. The decoders'
    own warnings (PIL's, numpy's) are not shown: what they mean is said in these words, or nothing can be done."""

    def __init__(self, folder: Path, paths: list[str], views: Views):
        self.folder, self.paths, self.views = folder, paths, views

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.folder / self.paths[i]
        shape = (self.views.views, 3, *self.views.size)
        kind = files.node_kind(path)
        if kind:  # a pipe would block the open forever (check_images refuses it before any encoding)
            return torch.zeros(shape), f"cannot read image {path}: it is {kind}, not a regular file", ""
        note = ""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as f:
                    if f.mode == "F" and not np.isfinite(np.asarray(f)).all():
                        note = "NaN or infinite pixels, taken as black"
                    image = to_rgb(f)
                views = self.views(image, self.paths[i])
        except (OSError, ValueError) as e:
            # reported by the main process with the file's name, instead of a worker's traceback
            return torch.zeros(shape), f"cannot read image {path}: {e}", ""
        return views, "", note


def check_images(folder: Path, paths: list[str]):
    """Open every image's header (no decoding) before anything is loaded or encoded; one line for all bad ones.

    A missing file, a folder, an empty or a non-image file fails here, all of them reported at once, instead
    of one by one after minutes of encoding. A file cut short after its header passes and still fails at
    decoding, with its name.
    """
    limit, large = Image.MAX_IMAGE_PIXELS, []

    def problem(rel: str) -> str:
        path = folder / rel
        kind = files.node_kind(path)  # a pipe, socket or device is never opened: open() could wait forever
        if kind:
            return f"{path} ({kind}, not a regular file)"
        try:
            with Image.open(path) as image:
                if limit and image.width * image.height > limit:
                    large.append((path, image.width, image.height))
                return "" if image.width and image.height else f"{path} (0 pixels)"
        except FileNotFoundError:
            return f"{path} (missing)"
        except UnidentifiedImageError:
            return f"{path} (not an image)"
        except Image.DecompressionBombError:
            return f"{path} (too large: more than {2 * limit:,} pixels, which PIL refuses to decode; resize it)"
        except Exception as e:
            return f"{path} ({type(e).__name__})"
    # threads overlap the waits on a slow (network) file system; chunks keep the pool's overhead off a fast one
    chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=16) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said below, once, in these words
        bad = [p for found in pool.map(lambda chunk: [problem(p) for p in chunk], chunks) for p in found if p]
    if bad:
        raise DataError(f"{len(bad)} of {len(paths)} images cannot be read, e.g. {'; '.join(bad[:3])}; replace "
                        f"them or remove them from the split ({LAYOUT_HINT})")
    if large:
        path, w, h = large[0]
        print(f"warning: {len(large)} images are very large, e.g. {path} ({w} x {h} pixels, above the {limit:,} "
              f"that PIL warns about as a possible decompression bomb); they are decoded anyway, which takes time "
              f"and memory", file=sys.stderr)


def loader(files: ImageFiles, how: pace.Pace, device: torch.device) -> DataLoader:
    """The batches of (views [B, V, 3, H, W], error messages, notes) that encode_images encodes: whole images, as
    many as make at most how.batch_size views (at least one), decoded and augmented by how.workers processes."""
    return DataLoader(files, batch_size=max(1, how.batch_size // files.views.views), num_workers=how.workers,
                      pin_memory=device.type == "cuda")


def encode_images(encoder: backbones.Encoder, files: ImageFiles, how: pace.Pace, device: torch.device,
                  desc: str) -> torch.Tensor:
    """[V, N, d] L2-normalised float16 image features, encoded as `how` says (`how.batch_size` counts views)."""
    views = files.views.views
    chunks, notes = [], []
    with progress.bar(total=len(files) * views, desc=desc, unit="views") as bar:  # a bar on a terminal, lines in a log
        for x, errors, said in loader(files, how, device):
            if any(errors):
                raise DataError(f"{next(e for e in errors if e)}; replace the file or remove it from the split")
            done = sum(len(c) for c in chunks)                                    # images encoded before
            notes += [(files.paths[done + i], note) for i, note in enumerate(said) if note]
            f = pace.image_features(encoder, x.flatten(0, 1), how.precision, device)      # [B*V, d]
            check_encoded(f, [files.paths[done + i // views] for i in range(f.shape[0])], how.precision, "image")
            chunks.append(F.normalize(f.float(), dim=-1).unflatten(0, (-1, views)).half().cpu())
            bar.update(f.shape[0])
    if notes:
        print(f"warning: {len(notes)} of {len(files)} images of {desc} hold {notes[0][1]}, e.g. "
              f"{files.folder / notes[0][0]}", file=sys.stderr)
    return torch.cat(chunks).transpose(0, 1).contiguous()


def probe_images() -> list[Image.Image]:
    """Two fixed images, a colour gradient and seeded noise (96 x 128 pixels): what they encode into identifies a
    CLIP and its preprocessing by what they compute, whatever the weights' file or name."""
    y, x = np.mgrid[0:96, 0:128]
    gradient = np.stack([x * 2, y * 2, 255 - x - y], axis=-1).clip(0, 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    return [Image.fromarray(gradient), Image.fromarray(noise)]


def encode_probe(encoder: backbones.Encoder, device: torch.device, transform=None,
                 precision: str = "fp32") -> torch.Tensor:
    """[2, d] features of probe_images() (view 0, L2-normalised float16, as a test image's) at `precision`.
    transform: view 0's, default the encoder's own."""
    x = torch.stack([(transform or encoder.transform)(image) for image in probe_images()])
    return F.normalize(pace.image_features(encoder, x, precision, device), dim=-1).half().cpu()


def check_encoded(features: torch.Tensor, names: list[str], precision: str, what: str):
    """One line if CLIP gave a NaN, infinite or all-zero feature (its weights are finite, checked on loading, so
    its computation overflowed): such a feature must never reach a features file."""
    bad = ~torch.isfinite(features).all(-1) | (features.float().norm(dim=-1) == 0)            # [rows]
    if bad.any():
        first = names[int(bad.nonzero()[0])]
        hint = f"; {precision} overflowed: pass --precision fp32" if precision != "fp32" else ""
        raise DataError(f"CLIP gave NaN, infinite or zero {what} features for {int(bad.sum())} of {len(names)} rows, "
                        f"e.g. for {first!r}: the model's output is broken{hint}; nothing was written")


def encode_text(encoder: backbones.Encoder, prompts: list[list[str]], how: pace.Pace,
                device: torch.device) -> torch.Tensor:
    """[C, d] class features: the renormalised mean of each class's normalised prompt embeddings, float16.
    Sentences longer than the model's context are cut (the end-of-text token kept), as clip.tokenize(truncate)."""
    sentences = [s for p in prompts for s in p]
    tokens = encoder.tokenize(sentences)                                        # [S, context_length]
    emb = torch.cat([pace.text_features(encoder, t, how.precision, device)
                     for t in tokens.split(how.text_batch_size)])               # [S, d]
    check_encoded(emb, sentences, how.precision, "text")
    emb = F.normalize(emb, dim=-1)                                              # [S, d]
    means = torch.stack([e.mean(0) for e in emb.split([len(p) for p in prompts])])  # [C, d]
    return F.normalize(means, dim=-1).half().cpu()


# ----------------------------------------------------------------------------- the flags

def _fills_in_a_name(template: str) -> bool:
    """True if template.format(name) puts the name in and asks for nothing else ("{} texture.")."""
    try:
        return "\0" in template.format("\0")
    except (IndexError, KeyError, ValueError):  # "{} {}", "{name}", "{"
        return False


def check_flags(settings: Settings, batch_size: int | None, workers: int | None):
    """One clear line for the first setting out of its range (cli.RANGES, the table the flags are parsed with),
    before anything is read, loaded or encoded: for a caller of extract_features() as for the command line."""
    given = [("encode_batch_size", batch_size), ("workers", workers)]                  # None: the device's
    numbers = [("max_shots", settings.max_shots), ("views", settings.views),
               *(("seeds", seed) for seed in settings.seeds), *((k, v) for k, v in given if v is not None)]
    problems = [
        (not settings.seeds, "--seeds must list at least one seed"),
        (settings.precision not in (AUTO, *PRECISIONS),
         f"--precision must be one of {', '.join((AUTO, *PRECISIONS))}, not {settings.precision!r}"),
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

VIEW_RECIPE = ("view 0: the model's eval transform; views 1...: Tip-Adapter's augmentation (a random resized crop "
               "of 50-100 % at the model's input size and resampling, a random flip), seeded by the path and view")


def counted(n: int, thing: str) -> str:
    """1 image, 2 images."""
    return f"{n} {thing}{'s' * (n != 1)}"


def image_recipe(settings: Settings) -> dict:
    """What an image's features depend on besides the image and the model's weights: how its views are made and
    the precision they are encoded at (resolved settings: never AUTO). Every setting that changes an image's
    features joins it, so that a file made otherwise is refused with the difference named, never mixed with this
    run's features. (The file's text features are encoded at the same precision.)"""
    return {"views": VIEW_RECIPE, "precision": settings.precision}


def resolve_precision(settings: Settings, old: dict | None, device: torch.device) -> tuple[Settings, bool]:
    """The settings with the precision to encode at, and whether it is still to pass the check on the encoder
    (pace.choose_precision): the one asked for; for AUTO, an existing file's own (what it holds was encoded at it), else
    the device's fast one (pace.fast_precision), checked once the encoder is loaded."""
    if settings.precision != AUTO:
        return settings, False
    recorded = cache.recorded_precision(old)
    if recorded is not None:
        return dataclasses.replace(settings, precision=recorded), False
    return dataclasses.replace(settings, precision=pace.fast_precision(device)), True


def check_batch(encoder: backbones.Encoder, folder: Path, paths: list[str], sentences: list[str]):
    """What decides a lower precision: up to pace.CHECK of the images to encode (view 0), spread over them,
    [n, 3, H, W], and up to pace.CHECK of the sentences, as token ids [m, context_length]."""
    spread = lambda items: items[::max(1, len(items) // pace.CHECK)][:pace.CHECK]
    files = ImageFiles(folder, spread(paths), Views(encoder.transform, encoder.preprocess, 1))
    images = [files[i][0][0] for i in range(len(files))]  # an image that cannot be read: check_images said so
    size = encoder.preprocess.size
    return torch.stack(images) if images else torch.empty(0, 3, *size), encoder.tokenize(spread(sentences))


def prompts_for(settings: Settings, classnames: list[str]):
    """The run's prompt set, (key, {"prompts": {"positive", "negative"}: sentences per class, "made_with": the
    flags}), keyed by the sha256 of its sentences; and the settings with that key filled in (prompts_sha256)."""
    template = settings.template or dataset_template(settings.dataset)
    source = cupl_prompts(settings.dataset) if settings.prompts == CUPL else settings.prompts
    if settings.prompts in TEMPLATE_SETS:
        positive = [[t.format(c) for t in TEMPLATE_SETS[settings.prompts]] for c in classnames]
    else:
        positive = load_prompts(source, classnames, template) if source else [[template.format(c)] for c in classnames]
    negative = [[settings.negative_template.format(c)] for c in classnames]
    digest = hashlib.sha256(json.dumps([positive, negative]).encode()).hexdigest()
    made_with = {k: settings.record()[k] for k in ("prompts", "negative_template")} | {"template": template}
    return (digest, {"prompts": {"positive": positive, "negative": negative}, "made_with": made_with}), \
        dataclasses.replace(settings, prompts_sha256=digest)


def encode_texts(encoder: backbones.Encoder, texts: dict, how: pace.Pace, device: torch.device) -> dict:
    """The prompt sets with the text features of those that lack them encoded."""
    return {key: t if t["text"] is not None else
            {**t, "text": {side: encode_text(encoder, t["prompts"][side], how, device)
                           for side in ("positive", "negative")}}
            for key, t in texts.items()}


def encode_rows(encoder, work: cache.Work, old: dict | None, folder: Path, d: int, how: pace.Pace,
                device: torch.device, dataset: str) -> dict:
    """{split: {"features": [V, N, d] for train, [M, d] otherwise, "labels"}}: each row's views taken from the old
    file where it holds them, the views it lacks encoded (only those: view v does not depend on the others)."""
    out, start = {}, time.perf_counter()
    for split, (items, views) in work.jobs.items():
        feats = torch.empty(views, len(items), d, dtype=torch.float16)                      # [V, N, d]
        groups = {}  # (old split, views kept) -> [(row, old row)]
        for row, (old_split, old_row, kept) in enumerate(work.kept[split]):
            if kept:
                groups.setdefault((old_split, kept), []).append((row, old_row))
        for (old_split, kept), pairs in groups.items():
            rows, old_rows = (list(r) for r in zip(*pairs))
            have = old[old_split]["features"]                                               # [V', N', d] or [M', d]
            feats[:kept, rows] = have[:kept, old_rows] if old_split == "train" else have[old_rows][None]
        for first, rows in work.missing(split).items():
            files = ImageFiles(folder, [items[r][0] for r in rows],
                               Views(encoder.transform, encoder.preprocess, views - first, first))
            feats[first:, rows] = encode_images(encoder, files, how, device, f"{dataset} {split}")
        out[split] = {"features": feats if split == "train" else feats[0],
                      "labels": torch.tensor([y for _, y in items], dtype=torch.long)}
    if work.views:
        seconds = time.perf_counter() - start
        print(f"encoded {counted(work.images, 'image')} ({counted(work.views, 'view')}) in {seconds:.1f} s, "
              f"{work.views / max(seconds, 1e-9):.1f} views/s on {device} at {how.precision}")
    return out


def assemble(work: cache.Work, splits: Splits, key: str, feats: dict, logit_scale: float, recipe: dict) -> dict:
    """The features file's dict: what a fresh extraction of work.settings writes, with every prompt set."""
    settings, texts = work.settings, work.texts
    prints = lambda items: [work.prints[str(splits.images / p)] for p, _ in items]
    out = {"format": FORMAT, "dataset": dataset_name(settings.dataset), "backbone": settings.name,
           "classnames": splits.classnames, "logit_scale": logit_scale,
           "text": texts[key]["text"], "prompts": texts[key]["prompts"], "texts": texts, **feats,
           "paths": {split: [p for p, _ in items] for split, (items, _) in work.jobs.items()},
           "content": {split: {"sha256": [sha for sha, _ in prints(items)],
                               "stat": torch.tensor([stat for _, stat in prints(items)], dtype=torch.long).view(-1, 4)}
                       for split, (items, _) in work.jobs.items()},
           **work.subsets, "settings": settings.record(),
           "identity": {"model": {"name": settings.name, **work.weights}, "recipe": recipe,
                        "source": cache.source_of(settings, splits.images)}}
    if splits.class_map is not None:
        out["class_map"] = torch.tensor(splits.class_map, dtype=torch.long)
    if is_folder(settings.dataset):  # the split made for it: kept, it reproduces the file (as split.json)
        out["split"] = splits.coop_split()
    return out


def clip_facts(encoder, how: pace.Pace | None, old: dict | None, device: torch.device) -> dict:
    """What the model files trained on the file carry of its CLIP: view 0's preprocessing (open_clip's
    configuration) and the features of the two probe images (at the file's precision); and how the run encoded
    ("encoding": its Pace, threads, layout and device). Kept from the old file when no model was loaded."""
    if encoder is not None:
        return {"preprocess": encoder.config, "probe": encode_probe(encoder, device, precision=how.precision),
                "encoding": how.record(encoder, device)}
    return {k: old[k] for k in ("preprocess", "probe", "encoding") if old and k in old}


@dataclass(frozen=True)
class Extracted:
    """What an extraction gives a run: the file, and what in it the run asked for."""
    path: Path
    text: str | None = None    # the key of the run's prompt set in the file's texts; None: the file's own text
    views: int | None = None   # the training views the run asked for; None: all the file holds
    images: int = 0            # images encoded by this run (each once, whatever views it lacked)
    views_encoded: int = 0     # views encoded (forward passes)
    texts: int = 0             # prompt sets encoded


def grow(path: Path, settings: Settings, splits: Splits, prompt_set: tuple, checking: bool, overwrite: bool,
         known: dict, batch_size: int | None, workers: int | None, device: torch.device) -> Extracted:
    """Under the file's lock: plan again (another process may have written it while this one waited), encode what
    the file lacks, and write it whole. checking: the precision is AUTO's choice, still to pass pace.choose_precision
    once the encoder is loaded (else the file is encoded at fp32)."""
    old = None if overwrite or not path.exists() else existing(path)
    if checking and old is not None:  # written meanwhile: what it holds decides
        settings, checking = resolve_precision(dataclasses.replace(settings, precision=AUTO), old, device)
    work = cache.plan(path, old, settings, splits, prompt_set, image_recipe(settings), known)
    key = prompt_set[0]
    if not work.write and not work.refresh:
        print(f"reusing {path}: another process wrote what this run asks for")
        return Extracted(path, key, settings.views)
    to_encode = [work.jobs[s][0][r][0] for s in work.jobs for rows in work.missing(s).values() for r in rows]
    check_images(splits.images, to_encode)                                                 # before CLIP loads
    if work.notes:
        print(f"{path}: {'; '.join(work.notes)}")
    if work.write:
        kept = sum(len(rows) for rows in work.kept.values()) - work.images
        print(f"encoding {counted(work.images, 'image')} ({counted(work.views, 'view')}) and the text of "
              f"{counted(len(work.new_texts), 'prompt set')}" + (f"; {counted(kept, 'image')} kept from the file"
                                                                 if old else ""), flush=True)
    new_texts = len(work.new_texts)
    encoder = backbones.load(settings, device) if work.images or new_texts else None
    if encoder is not None and checking and settings.precision != "fp32":
        sentences = [s for k in work.new_texts for side in work.texts[k]["prompts"].values() for p in side for s in p]
        check = check_batch(encoder, splits.images, to_encode, sentences)
        if pace.choose_precision(encoder, settings.precision, device, check) == "fp32":
            settings = dataclasses.replace(settings, precision="fp32")
            work = cache.plan(path, old, settings, splits, prompt_set, image_recipe(settings), known)
    how = pace.choose_pace(encoder, settings.precision, batch_size, workers, device) if encoder else None
    texts = encode_texts(encoder, work.texts, how, device) if encoder else work.texts
    work = dataclasses.replace(work, texts=texts)
    d = next(iter(texts.values()))["text"]["positive"].shape[1]
    feats = encode_rows(encoder, work, old, splits.images, d, how, device, dataset_name(settings.dataset))
    scale = encoder.model.logit_scale.exp().item() if encoder else float(old["logit_scale"])
    out = assemble(work, splits, key, feats, scale, image_recipe(settings)) | clip_facts(encoder, how, old, device)
    files.write_atomic(path, lambda f: torch.save(out, f), needed_bytes=_nbytes(out) + (1 << 20), flag="--features-dir")
    print(f"wrote {path}")
    return Extracted(path, key, settings.views, work.images, work.views, new_texts)


def serve_without_dataset(path: Path, settings: Settings, folder: Path, batch_size: int | None,
                          device: torch.device) -> Extracted:
    """train.py on a features file whose dataset folder is absent: the file serves only what it holds (with the
    file's own class names, the prompts asked for are rebuilt; a prompt set it lacks is encoded, which needs the
    model only)."""
    old = existing(path)
    if "settings" not in old:  # written by another tool: no extraction flag ever applied to it
        print(f"note: {folder} is absent and {path} records no extraction settings, so it is used as it is")
        return Extracted(path)
    # the names as the prompts say them: a file written with underscored prompts is stale, and refused
    prompt_set, settings = prompts_for(settings, [prompt_name(c) for c in old.get("classnames", [])])
    settings, _ = resolve_precision(settings, old, device)  # AUTO: the file's own
    key, recipe = prompt_set[0], image_recipe(settings)
    cache.check_absent(path, old, settings, recipe, folder)
    if key not in old["texts"]:
        with files.acquire(files.file_lock(path), path):
            old = existing(path)
            if key not in old["texts"]:
                print(f"{path}: adds the prompt set of {cache.prompt_note(prompt_set[1]['made_with'])} (the dataset "
                      f"folder {folder} is absent; the text needs the model only)")
                encoder = backbones.load(settings, device)
                texts = encode_texts(encoder, {key: {**prompt_set[1], "text": None}},
                                     pace.choose_pace(encoder, settings.precision, batch_size, 0, device), device)
                made = {**old["settings"], **{k: settings.record()[k] for k in
                                              ("prompts", "template", "negative_template", "prompts_sha256")}}
                out = {**old, "texts": {**old["texts"], **texts}, "text": texts[key]["text"],
                       "prompts": texts[key]["prompts"], "settings": made}
                files.write_atomic(path, lambda f: torch.save(out, f), needed_bytes=_nbytes(out) + (1 << 20),
                                   flag="--features-dir")
                print(f"wrote {path}")
                return Extracted(path, key, settings.views, texts=1)
    print(f"reusing {path}: it holds what this run asks for (the dataset folder {folder} is absent)")
    return Extracted(path, key, settings.views)


def extract(settings: Settings, root, out_dir="features", *, batch_size: int | None = None, workers: int | None = None,
            device=None, overwrite: bool = False, download: bool = False, shots_flag: str = "--max-shots") -> Extracted:
    """Encode `settings.dataset` (under `root`, or a folder of its own) with CLIP into its features file, or reuse
    and grow the one there (cache.py); what the run asked for in it. download: fetch a benchmark dataset into
    `root` first if it is not there. shots_flag: the flag that set max-shots (train.py's --shots sets it for a
    folder), which a class with too few images is told to lower.

    A file that holds what the run asks for is reused (also when the dataset folder is absent); one that lacks
    some of it gets only that encoded (images by content, prompt sets by their sentences); one made with other
    weights or another view recipe is refused unless `overwrite`, which extracts afresh. Processes writing the
    same file take turns (file_lock): the second plans again with what the first wrote.
    """
    settings = dataclasses.replace(settings, dataset=resolve_dataset(settings.dataset),
                                   seeds=tuple(dict.fromkeys(int(s) for s in settings.seeds)),
                                   max_shots=DEFAULT_MAX_SHOTS if settings.max_shots is None else settings.max_shots)
    check_flags(settings, batch_size, workers)
    device = resolve_device(device)
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
            return serve_without_dataset(path, settings, folder, batch_size, device)
        except DataError:
            if not download:  # else the dataset is fetched, and the file compared again below
                raise
    if download:
        download_dataset(settings.dataset, root)

    splits = load_splits(settings.dataset, root, outputs=(out_dir,))  # --features-dir is never a class
    splits.images = splits.images.absolute()  # what the file records its images' place and dates by
    if is_folder(settings.dataset):  # a folder's split is made from its files: recorded, and said when it changes
        settings = dataclasses.replace(settings, split_sha256=splits.sha256())
    prompt_set, settings = prompts_for(settings, splits.classnames)
    # the run's own request, checked as a fresh extraction checks it: one line if it cannot be met
    cache.plan_encoding(splits, settings.seeds, settings.max_shots, settings.views, settings.allow_repeats, shots_flag)
    # reading needs no lock (a shared folder may be read-only)
    old = None if overwrite or not path.exists() else existing(path)
    settings, checking = resolve_precision(settings, old, device)
    work = cache.plan(path, old, settings, splits, prompt_set, image_recipe(settings))
    if not work.write and not work.refresh:
        print(f"reusing {path}: it holds what this run asks for")
        return Extracted(path, prompt_set[0], settings.views)
    try:  # held from the plan to the write: a second process waits, then plans with what this one wrote
        with files.acquire(files.file_lock(path), path):
            return grow(path, settings, splits, prompt_set, checking, overwrite, work.prints, batch_size, workers,
                        device)
    except OSError:
        if work.write:
            raise
        # only the images' recorded dates were to be refreshed (their content is the same): a folder that cannot
        # be written serves as it is, and the next run reads the images again
        print(f"reusing {path}: it holds what this run asks for")
        return Extracted(path, prompt_set[0], settings.views)


def extract_features(settings: Settings, root, out_dir="features", **options) -> Path:
    """extract() of these settings; returns the features file's path (the options: extract()'s)."""
    return extract(settings, root, out_dir, **options).path


def _nbytes(data) -> int:
    """The bytes of the tensors in `data` (nested dicts and lists): about what torch.save writes of it."""
    if isinstance(data, torch.Tensor):
        return data.numel() * data.element_size()
    if isinstance(data, dict):
        data = data.values()
    return sum(map(_nbytes, data)) if isinstance(data, (list, tuple, type({}.values()))) else 0


@dataclass(frozen=True)
class Extraction:
    """How a command extracts features when it needs them: what determines them (the settings; the dataset and
    the seeds are the run's), where the datasets and the features files are, and how fast to encode."""
    settings: Settings = Settings("")      # dataset and seeds are filled in by extract()
    root: Path = Path("data")              # the folder holding the dataset folders in CoOp's layout
    features_dir: Path = Path("features")  # where features files are written and looked up
    batch_size: int | None = None          # images (views) per CLIP forward pass; None: the device's (pace.py)
    workers: int | None = None             # data loading processes; None: the device's (pace.py)
    download: bool = False                 # fetch a benchmark dataset into root first if it is not there

    def run(self, dataset: str, seeds, device=None, overwrite: bool = False, like: dict | None = None,
            shots: int | None = None) -> Extracted:
        """extract() of `dataset` with these settings and `seeds`. like: a features file's dict whose CLIP is used
        instead of the one the settings name (its recorded model, or for a file without settings its backbone's
        name), at its precision unless one is asked for. shots: the run's K, which max-shots defaults to for a
        folder dataset (at least DEFAULT_MAX_SHOTS for a benchmark, so that one file serves the protocol's K)."""
        settings, flag = dataclasses.replace(self.settings, dataset=dataset, seeds=tuple(seeds)), "--max-shots"
        if settings.max_shots is None and shots is not None:
            folder = is_folder(resolve_dataset(dataset))
            settings = dataclasses.replace(settings, max_shots=shots if folder else max(shots, DEFAULT_MAX_SHOTS))
            flag = "--shots" if folder else flag
        if like is not None:
            made = like.get("settings") if isinstance(like.get("settings"), dict) else {}
            settings = dataclasses.replace(settings, backbone=made.get("backbone", like.get("backbone")),
                                           pretrained=made.get("pretrained"),
                                           clip_checkpoint=made.get("clip_checkpoint"))
            if settings.precision == AUTO:
                settings = dataclasses.replace(settings, precision=cache.recorded_precision(like) or AUTO)
        return extract(settings, self.root, self.features_dir, batch_size=self.batch_size, workers=self.workers,
                       device=device, overwrite=overwrite, download=self.download, shots_flag=flag)

    def extract(self, dataset: str, seeds, device=None, overwrite: bool = False, like: dict | None = None,
                shots: int | None = None) -> Path:
        """run(); the features file's path."""
        return self.run(dataset, seeds, device, overwrite, like, shots).path

    def features(self, dataset: str, seeds, device=None, overwrite: bool = False, like: dict | None = None,
                 shots: int | None = None) -> dict:
        """run(); the features as training reads them, with the prompt set and the views the run asked for."""
        done = self.run(dataset, seeds, device, overwrite, like, shots)
        return load_features(done.path, views=done.views, text=done.text)

    def backbone_name(self) -> str:
        """The name of the CLIP the settings ask for, as features files and results show it."""
        return backbones.resolve(self.settings).name

    def path(self, dataset: str) -> Path | None:
        """The features file `dataset` is extracted into or reused from; None while its CLIP cannot be named (a
        checkpoint that is not there yet): the extraction then says why, in its turn."""
        try:
            return features_path(self.features_dir, dataset_name(dataset), self.backbone_name())
        except DataError:
            return None
