"""The features file: the contract between the extraction, which writes it, and training, which reads it.

One torch.save'd dict, every feature L2-normalised float16 (docs/features-file.md has the full layout):

    format "hegraphadapter-features-v2", dataset, backbone (the model's name), logit_scale, classnames [C],
    text {positive [C, d], negative [C, d]} and prompts: the prompt set of the last run (texts: every set),
    train {features [V, N, d], labels [N]}, val / test {features [M, d], labels [M]},
    fewshot {seed: [C, max_shots] rows of train}, val_fewshot {seed: [C, min(max_shots, 4)] rows of val},
    plus class_map [C] (ImageNet shift sets), split (a folder dataset's, in CoOp's format), paths and content
    (each row's image and its sha256), identity (the model's weights by content, the view recipe, the images'
    folder), preprocess and probe (view 0's preprocessing and two fixed images' features, which the model files
    trained on it carry) and settings: what every run asked of it together (cache.py grows it).

Here: the Settings (what an extraction is asked for and a file records), reading a file (the prompt set and the
views a run asked for) and checking every tensor training uses, and the identity of what a run reads.
"""
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot.backbones import OPENAI_NAMES, OPENAI_TAG
from fewshot.datasets import VAL_SHOTS, dataset_name
from fewshot.errors import DataError
from fewshot.files import load_torch_file

FORMAT = "hegraphadapter-features-v2"
OLD_FORMAT = "hegraphadapter-features-v1"  # read for training; not grown (it does not record what its images held)
DEFAULT_MAX_SHOTS = 16                     # max-shots of a benchmark's file unless asked: one file for K 1 ... 16
PRECISIONS = ("fp32", "bf16", "fp16")      # what a file can be encoded at: float32, or autocast to bfloat16 / float16
AUTO = "auto"                              # asked for: the file's own precision, or the device's fast one where its
                                           # features match fp32's (extraction.choose_precision)


# ----------------------------------------------------------------------------- what a file was made with

@dataclass(frozen=True)
class Settings:
    """What a features file is extracted with: what extract_features takes and what the file records (record()).
    An existing file serves a run whose seeds, max-shots and views it holds, and grows to serve one that asks for
    more (cache.py). The encoding's speed settings (batch size, workers, device) change no feature and are not
    part of it; its precision does, a little, so it is (as part of the view recipe, extraction.image_recipe)."""
    dataset: str                           # dataset key, e.g. "dtd", or a folder of class subfolders (absolute)
    backbone: str | None = None            # the CLIP (backbones.py); None: RN50, or what clip_checkpoint holds
    pretrained: str | None = None          # its weights: an open_clip tag or file; None: OpenAI's, or its own
    clip_checkpoint: str | None = None     # a local OpenAI-format checkpoint (absolute path) loaded instead
    prompts: str | None = None             # None: the template; "cupl"; or a json file's path
    template: str | None = None            # template of the positive prompts; None: the dataset's own
    negative_template: str = "a photo of no {}."  # template of the negative prompts
    seeds: tuple[int, ...] = (1, 2, 3)     # few-shot seeds, each drawing its own subsets
    max_shots: int | None = None           # training images per class per seed; K shots are the first K. None:
                                           # DEFAULT_MAX_SHOTS, or for a folder dataset the run's K (train.py)
    views: int = 10                        # views per training image: CLIP's preprocessing + augmented crops
    allow_repeats: bool = False            # a class with fewer images than max_shots repeats them
    precision: str = AUTO                  # the encoder's arithmetic, one of PRECISIONS; AUTO: chosen (resolved
                                           # before any planning, so a file records the one used)
    prompts_sha256: str | None = None      # hash of the positive and negative sentences (filled in once read):
                                           # the key of their prompt set in the file's texts
    split_sha256: str | None = None        # a folder dataset's split, hashed (filled in once read); None: a
                                           # benchmark's split, fixed by its own files

    @property
    def name(self) -> str:
        """The model as results and file names show it (resolved settings): OpenAI's name for OpenAI's weights
        (ViT-B/32), name:tag for other weights (ViT-B-16:laion2b_s34b_b88k), name:FILE for a weights file,
        local-dir:FOLDER (the folder's own name), hf-hub:ORG/REPO, or a checkpoint's architecture."""
        if self.backbone is None:
            raise ValueError("Settings.name is that of resolved settings (backbones.resolve)")
        if self.backbone.startswith("local-dir:"):
            return "local-dir:" + Path(self.backbone.removeprefix("local-dir:")).name
        if self.pretrained is None or self.pretrained == OPENAI_TAG and self.backbone in OPENAI_NAMES:
            return self.backbone
        return f"{self.backbone}:{Path(self.pretrained).name}"

    def test_only(self):
        """The settings of a test-only set (an ImageNet shift set): no subsets and no training views, so the
        main run's seeds, max_shots, views and allow_repeats mean nothing for it."""
        return dataclasses.replace(self, seeds=(), max_shots=0, views=1, allow_repeats=False)

    def record(self) -> dict:
        """The settings as the file stores and compares them: a folder dataset and the prompts file by their names
        (their content is compared by hashes: the split's and the sentences'), plain lists and strings."""
        prompts = self.prompts if self.prompts in (None, "cupl") else Path(self.prompts).name
        checkpoint = self.clip_checkpoint and str(Path(self.clip_checkpoint).resolve())
        return {"format": FORMAT, **dataclasses.asdict(self), "dataset": dataset_name(self.dataset),
                "prompts": prompts or "templates", "clip_checkpoint": checkpoint, "seeds": list(self.seeds)}


def features_path(out_dir, dataset: str, backbone: str) -> Path:
    """The file a dataset's features are written to, e.g. features/dtd_RN50.pt (ViT-B/32 -> ViT-B-32); a folder
    dataset's is named after the folder (path/to/my_images -> features/my_images_RN50.pt)."""
    return Path(out_dir) / f"{dataset_name(dataset)}_{re.sub(r'[^A-Za-z0-9_.-]', '-', backbone)}.pt"


def load_features(path, views: int | None = None, text: str | None = None) -> dict:
    """Read a features file and check every tensor train.py will use; one DataError line otherwise.

    views: the training views a run asked for (the first ones; None: all). text: the key of the prompt set it asked
    for (its prompts_sha256; None: the file's `text`, the last run's). The dict returned is what training reads,
    with text_set saying which prompt set that is."""
    data = load_torch_file(path, "features file")
    if not isinstance(data, dict) or data.get("format") not in (FORMAT, OLD_FORMAT):
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path} is not a features file of format {FORMAT!r} (found {found!r})")
    texts, made = data.get("texts"), data.get("settings") if isinstance(data.get("settings"), dict) else {}
    key = text if text is not None else made.get("prompts_sha256")
    if text is not None and (not isinstance(texts, dict) or text not in texts):
        raise DataError(f"{path} holds no prompt set {text[:12]}; run the extraction again, which adds it")
    if isinstance(texts, dict) and key in texts:
        chosen = texts[key]
        data["text"], data["prompts"] = chosen["text"], chosen["prompts"]
        data["text_set"] = {"sha256": key, **chosen.get("made_with", {})}
    if views is not None and isinstance(data.get("train"), dict) and \
            isinstance(data["train"].get("features"), torch.Tensor):
        held = data["train"]["features"].shape[0]
        if views > held:
            raise DataError(f"{path} holds {held} views of each training image, and {views} were asked for; run "
                            f"the extraction again, which adds them")
        data["train"]["features"] = data["train"]["features"][:views]
    check_features(data, path)
    return data


def _get(data, key, path):
    """data["text"]["positive"] for key "text.positive", or one line naming the missing key."""
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DataError(f"{path} lacks {key!r}, which format {FORMAT} requires; re-extract it")
        node = node[part]
    return node


def _tensor(data, key, ndim, path, integer=False):
    """The tensor at `key`, checked to be a float (or integer, not bool: a bool index would be a mask) tensor
    with `ndim` dimensions, none of them empty."""
    t = _get(data, key, path)
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or t.is_floating_point() == integer or \
            t.dtype == torch.bool or t.is_complex():
        kind = "an integer" if integer else "a float"
        raise DataError(f"{path}: {key!r} must be {kind} tensor with {ndim} dimensions, got "
                        f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
    if 0 in t.shape:
        raise DataError(f"{path}: {key!r} is empty ({list(t.shape)}); re-extract the features")
    return t


def _logit_scale(data, path):
    """CLIP's logit scale: a finite number above 0 (0 makes every prediction a tie, a negative one inverts it)."""
    scale = _get(data, "logit_scale", path)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise DataError(f"{path}: 'logit_scale' must be a finite number above 0 (exp of CLIP's logit_scale, 100 "
                        f"for the released models), got {scale!r}; re-extract the features")


def _check_unit_rows(t, key, path):
    """NaN rows would be scored as class 0 by argmax, and all-zero rows as any class: both are refused."""
    bad = (~torch.isfinite(t.float()).all(-1) | (t.float().norm(dim=-1) == 0)).sum().item()
    if bad:
        raise DataError(f"{path}: {bad} of {t[..., 0].numel()} rows of {key!r} are NaN, infinite or all zero; "
                        f"re-extract the features")


def _labels(data, key, n, C, path):
    """The integer labels at `key`: n of them, each a class index below C."""
    y = _tensor(data, key, 1, path, integer=True)
    if len(y) != n:
        raise DataError(f"{path}: {key!r} has {len(y)} labels for {n} feature rows")
    if len(y) and (y.min() < 0 or y.max() >= C):
        raise DataError(f"{path}: {key!r} lie in {y.min().item()}..{y.max().item()}, outside the {C} classes")
    return y


def _check_subsets(data, key, labels, C, path):
    """Each seed's [C, shots] few-shot rows at `key` index the split and row c lists images of class c."""
    subsets = _get(data, key, path)
    if not isinstance(subsets, dict) or not subsets:
        raise DataError(f"{path}: {key!r} must map each seed to its rows, and is {type(subsets).__name__} "
                        f"{'(empty)' if isinstance(subsets, dict) else ''}; re-extract the features")
    for seed, rows in subsets.items():
        name = f"{key}[{seed}]"
        if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or rows.shape[0] != C or rows.shape[1] == 0 or \
                rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise DataError(f"{path}: {name} must be an integer tensor [{C}, shots] with shots >= 1, got "
                            f"{getattr(rows, 'dtype', type(rows).__name__)} {list(getattr(rows, 'shape', []))}")
        rows = rows.long()  # a small integer type would still index; a uint8 or bool one would mask
        if rows.min() < 0 or rows.max() >= len(labels):
            raise DataError(f"{path}: {name} indexes rows {rows.min().item()}..{rows.max().item()} of a split "
                            f"that has {len(labels)}")
        if not (labels.long()[rows] == torch.arange(C)[:, None]).all():
            raise DataError(f"{path}: {name} row c must list images of class c, and does not")


def check_features(data, path):
    """One DataError naming the first key of a features file that train.py cannot use, and why."""
    _get(data, "backbone", path)
    _logit_scale(data, path)
    pos = _tensor(data, "text.positive", 2, path)
    C, d = pos.shape
    names = _get(data, "classnames", path)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'classnames' must be a list of strings, got {type(names).__name__}")
    if len(names) != C:
        raise DataError(f"{path}: {len(names)} class names but {C} positive text features")
    _check_unit_rows(pos, "text.positive", path)
    if "negative" in data["text"]:
        neg = _tensor(data, "text.negative", 2, path)
        if neg.shape != pos.shape:
            raise DataError(f"{path}: 'text.negative' is {list(neg.shape)}, 'text.positive' {list(pos.shape)}")
        _check_unit_rows(neg, "text.negative", path)
    splits = {"test": 2} | {s: n for s, n in (("train", 3), ("val", 2)) if s in data}
    for split, ndim in splits.items():
        feats = _tensor(data, f"{split}.features", ndim, path)
        if feats.shape[-1] != d:
            raise DataError(f"{path}: {split} features have size {feats.shape[-1]}, text features {d}: they "
                            f"must come from the same encoder")
        _check_unit_rows(feats, f"{split}.features", path)
        labels = _labels(data, f"{split}.labels", feats.shape[-2], C, path)
        if split in ("train", "val"):
            _check_subsets(data, {"train": "fewshot", "val": "val_fewshot"}[split], labels, C, path)
    if "class_map" in data:
        _labels(data, "class_map", C, 10**9, path)


# ----------------------------------------------------------------------------- what a run reads

def existing(path: Path) -> dict:
    """The dict in the features file at `path`, its tensors mapped rather than read; one line if it is none."""
    try:
        data = load_torch_file(path, "features file", mmap=True)
    except DataError as e:
        raise DataError(f"{e}; pass --overwrite to replace it or choose another --features-dir") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} exists and is not a features file; pass --overwrite to replace it or choose "
                        f"another --features-dir")
    return data


def used_rows(data, seeds, max_shots) -> dict:
    """{split: sorted rows} that a run of these seeds and max-shots reads: its few-shot and validation subsets,
    and the whole test split."""
    rows = {"test": list(range(len(data["test"]["labels"])))}
    for split, key, shots in (("train", "fewshot", max_shots), ("val", "val_fewshot", min(max_shots, VAL_SHOTS))):
        if key in data and split in data:
            picked = [data[key][s][:, :shots].flatten() for s in seeds if s in data[key]]
            rows[split] = torch.cat(picked).unique().tolist() if picked else []
    return rows


def identity(data, seeds, max_shots) -> str | None:
    """What the features a run of these seeds and max-shots reads depend on, as one sha256: the model's weights (by
    content) and the view recipe, and every image it reads (its path and content). A file grown with other seeds or
    prompt sets keeps it; one whose weights or images changed does not. None for a file that does not record
    them (another tool's, or format v1)."""
    ident, content = data.get("identity"), data.get("content")
    if not isinstance(ident, dict) or not isinstance(content, dict):
        return None
    images = {split: [[data["paths"][split][i], content[split]["sha256"][i]] for i in rows]
              for split, rows in used_rows(data, seeds, max_shots).items()}
    what = {"model": ident["model"]["content"], "recipe": ident["recipe"], "images": images}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
