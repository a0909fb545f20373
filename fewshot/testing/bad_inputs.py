"""The registry of bad inputs: every case once, with what the project promises for it, run by the tests (in
this process) and by bench/bad_inputs.py (as real commands, for the table in docs/bad-inputs.md).

A case is a command line of train.py, extract_features.py or predict.py, a way to break a copy of the shared
fixtures (a random CLIP, a CoOp-layout dataset, a synthetic features file, model files; breaking.py), and at times a
stand-in it runs within (a local server, no network, a full disk); cases come in families, one per kind of
input. What a bad input must get:

- exactly ONE `error: ...` line on stderr, as a terminal shows it (tqdm redraws a line after "\\r" and clears it
  when closed, so only the text after the last "\\r" of each line counts), naming only flags the command has,
  holding the case's `expect` words and none of its `avoid` words, and a non-zero exit; never an accuracy with
  exit 0, and from extract_features.py never a features file;
- nothing lost: every file that existed before (a sentinel "previous results" at --out, the inputs, the shared
  fixtures) is unchanged, nothing half-written appears, no hidden .*.tmp is left (a download's files, checked
  and kept in ROOT/FOLDER.download/ for the rerun, are its documented staging);
- an end within the case's `seconds`, where it has one (nothing may hang).

Controls (a 16-bit PNG, --epochs 0, a link not followed, a stale features file) are not bad inputs: they must
succeed, their stderr must hold their `expect` words, and their check must pass. A stale features file (an image
changed under its name, a checkpoint replaced at its path, a folder of the same name elsewhere) is such a control:
it must not be reused, and the file rewritten (its `rewrites`) must equal a fresh extraction.
"""
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewshot import classify, cli, runs
from fewshot.extraction import extract_features
from fewshot.features import Settings
from fewshot.testing.breaking import (
    FEATURES,
    NOT_UTF8,
    a_file,
    a_folder,
    a_pipe,
    as_fresh,
    both,
    changed_image,
    checkpoint_changed,
    checkpoints,
    classes_here,
    classes_here_only,
    clip_changed,
    clip_recorded,
    config_text,
    copied_features,
    cut,
    dataset,
    disk_free,
    dtd_folder_beside_dtd,
    extracted,
    feats_copy,
    features_before_open_clip,
    fifo,
    folder_elsewhere,
    folder_fifo,
    fractional_label,
    hand_placed,
    hub,
    image_folder,
    image_twice,
    latin1_class,
    latin1_image,
    link,
    link_out,
    listed,
    local_dir,
    mixed_seeds,
    nan_tiff,
    no_file,
    no_network,
    no_weights,
    none_under,
    older_config,
    once,
    other_checkpoint,
    other_classes,
    pil_limit,
    prompts_added,
    quiet,
    replaced_checkpoint,
    results_json,
    results_json_of,
    rows,
    same_16_and_8_bit_features,
    served_archive,
    serving,
    silent,
    sixteen_bit_png,
    split_changed,
    split_file_a_fifo,
    split_paths,
    spoiled,
    tar_member,
    test_image_a_fifo,
    touched,
    truncate,
    truncated_image,
    unreadable_images,
    warned,
    weights_changed,
    weights_replaced,
    without_split_file,
    zip_member,
)
from fewshot.testing.fixtures import (
    TINY_NAMES,
    TINY_OPEN_CLIP,
    synthetic_features,
    tiny_clip,
    tiny_open_clip,
    write_dataset,
)

SENTINEL = b"previous results\n"             # what --out (and features/previous.pt) hold before each case
# every command gets these first; a case's own flags come after and win (argparse keeps the last value)
COMMON = "--device cpu --workers 0 --clip-checkpoint {clip} --features-dir features --seeds 1 " \
         "--max-shots 2 --views 2"
PREDICT_COMMON = "--device cpu"  # predict.py's: it has none of the extraction's flags
NO_CLIP = "--device cpu --workers 0 --features-dir features --seeds 1 --max-shots 2 --views 2"  # a model named
DOWNLOAD = "--dataset dtd --root data --download"                    # --download from the stand-in host
FAST = dict(STALL_S=0.5, GRACE_S=0.5, MIN_RATE=1_000_000)          # a slow transfer ends in a second here
NO_CUDA = lambda: not torch.cuda.is_available()
NO_MPS = lambda: not torch.backends.mps.is_available()


# -----------------------------------------------------------------------------
# shared fixtures: built once, on first use, in TMP/shared; no case may change them

class Fixtures:
    """The inputs cases share, each built when a case first asks for it (fixtures["feats"] in a template)."""

    def __init__(self, folder: Path):
        self.dir = folder
        folder.mkdir(parents=True, exist_ok=True)

    def __getitem__(self, name):  # str.format_map(fixtures): "{feats}" -> the path, built if needed
        return getattr(self, name)

    @functools.cached_property
    def clip(self):
        """A random ViT CLIP (32 px, d = 32), as the tests' tiny_vit_checkpoint."""
        return tiny_clip(self.dir / "clip.pt", "vit")

    @functools.cached_property
    def openclip(self):
        """A random open_clip-native CLIP folder (--backbone local-dir:FOLDER), as the tests' tiny_open_clip_dir."""
        return tiny_open_clip(self.dir / "openclip")

    @functools.cached_property
    def feats(self):
        """A synthetic features file (5 classes, max-shots 4, seeds 1 2)."""
        return synthetic_features(self.dir / "synthetic.pt", C=5, test_per_class=6, seeds=(1, 2))

    @functools.cached_property
    def data(self):
        """A clean dtd dataset in CoOp's layout (3 classes, 38 small JPEGs)."""
        return write_dataset(self.dir / "data", "dtd")

    @functools.cached_property
    def dtd_features(self):
        """dtd's features, extracted with COMMON's settings (seeds 1, max-shots 2, views 2)."""
        with quiet():
            settings = Settings("dtd", clip_checkpoint=self.clip, seeds=(1,), max_shots=2, views=2)
            return extract_features(settings, self.data, self.dir / "features", workers=0, device="cpu")

    @functools.cached_property
    def ck(self):
        """A checkpoint folder: hegraph-t, 2 shots, seeds 1 and 2 (train.py --save)."""
        return self._save("hegraph-t", (1, 2), "ck_t")

    @functools.cached_property
    def model(self):
        """A model folder trained on dtd's features (hegraph-t, 2 shots, seed 1): predict.py classifies images
        with it, its CLIP being the ViT checkpoint `clip`."""
        argv = ["--features", str(self.dtd_features), "--method", "hegraph-t", "--shots", "2", "--epochs", "1",
                "--seeds", "1", "--save", str(self.dir / "model"), "--device", "cpu"]
        with quiet():
            runs.run(cli.train_request(argv))
        return self.dir / "model"

    @functools.cached_property
    def photo(self):
        """A JPEG of the dtd dataset, copied to a path without spaces."""
        shutil.copy(Path(self.data) / "dtd" / "images" / "class a_0" / "test_0.jpg", self.dir / "photo.jpg")
        return self.dir / "photo.jpg"

    @functools.cached_property
    def other_clip(self):
        """Another random CLIP with the same feature size (the tiny ResNet)."""
        return tiny_clip(self.dir / "other_clip.pt", "resnet")

    @functools.cached_property
    def ck_full(self):
        """Another run's checkpoint folder: hegraph, 2 shots, seed 2."""
        return self._save("hegraph", (2,), "ck_full")

    def _save(self, method, seeds, name):
        argv = ["--features", str(self.feats), "--method", method, "--shots", "2", "--epochs", "1",
                "--seeds", *map(str, seeds), "--save", str(self.dir / name)]
        with quiet():
            runs.run(cli.train_request(argv))
        return self.dir / name


# -----------------------------------------------------------------------------
# how model files and predict.py's inputs are broken (the other inputs: breaking.py)

def renamed_seed(ck, fx):
    """seed1.pt renamed seed2.pt (seed 2's own file removed)."""
    (ck / "seed2.pt").unlink()
    (ck / "seed1.pt").rename(ck / "seed2.pt")


def older_checkpoint(ck, fx):
    """seed1.pt as train.py wrote checkpoints before model files stood alone: run, seed, state_dict, config."""
    m = torch.load(ck / "seed1.pt", weights_only=True)
    torch.save({k: m[k] for k in ("run", "seed", "state_dict", "model_config")}, ck / "seed1.pt")


def no_val_subset_for_seed_2(case, fx):
    """f.pt: the synthetic features (seeds 1 2) without seed 2's validation subset."""
    spoiled(lambda d: d["val_fewshot"].pop(2))(case, fx)


def other_fewshot_images(case, fx):
    """f.pt: features of the same classes, backbone and sizes as the models in ck/, other images."""
    synthetic_features(case / "f.pt", C=5, test_per_class=6, seeds=(1, 2), seed=7)
    checkpoints()(case, fx)


def no_negatives_file(case, fx):
    """f.pt: the synthetic features without negative text features; full/: a hegraph model trained with them."""
    spoiled(lambda d: d["text"].pop("negative"))(case, fx)
    shutil.copytree(fx.ck_full, case / "full")


def same_accuracy_without_negatives(outcome):
    """check of the control: the model (trained with negatives, which it carries) evaluates as it did."""
    return [] if json.loads((outcome.folder / "r.json").read_text())["seeds"] else ["no accuracy recorded"]


def model_copy(then=None):
    """model/: a copy of the dtd model folder, then then(model folder, fixtures)."""
    def prepare(case, fx):
        shutil.copytree(fx.model, case / "model")
        if then:
            then(case / "model", fx)
    return prepare


def model_changed(change):
    """model/ with change(seed1.pt's dict) applied."""
    def then(folder, fx):
        m = torch.load(folder / "seed1.pt", weights_only=True)
        change(m)
        torch.save(m, folder / "seed1.pt")
    return model_copy(then)


def features_as_model(case, fx):
    """model/seed1.pt: a features file, not a model file."""
    (case / "model").mkdir()
    shutil.copy(fx.feats, case / "model" / "seed1.pt")


def moved_clip(folder, fx):
    """model/: the model's CLIP checkpoint recorded at a path that no longer exists."""
    m = torch.load(folder / "seed1.pt", weights_only=True)
    m["clip"]["clip_checkpoint"] = str(folder / "gone" / "clip.pt")
    torch.save(m, folder / "seed1.pt")


def unreadable_photos(case, fx):
    """photos/: a text file named .jpg and an empty .png, nothing readable."""
    (case / "photos").mkdir()
    (case / "photos" / "a.jpg").write_text("not an image")
    (case / "photos" / "b.png").write_bytes(b"")


def predictions_json(outcome):
    """check of the predict control: the photo's 2 most probable classes in p.json."""
    rows = json.loads((outcome.folder / "p.json").read_text())["predictions"]
    return [] if len(rows) == 1 and len(rows[0]["top"]) == 2 else [f"p.json has {len(rows)} predictions"]


# -----------------------------------------------------------------------------
# the cases, by family: name -> Case

@dataclass(frozen=True)
class Case:
    script: str                       # "train", "extract" or "predict"
    bad: str                          # the bad input, in words
    args: str                         # after `common`; {name} is a shared fixture, other paths are the case's own
    prepare: Callable | None = None   # (case folder, fixtures): make the case's broken inputs (breaking.py)
    control: bool = False             # not a bad input: must succeed
    check: Callable | None = None     # (outcome) -> problems: what its run must also show
    expect: tuple = ()                # words the error line (a control: its stderr) must hold
    avoid: tuple = ()                 # words it must not hold
    within: Callable | None = None    # (case folder) -> context manager the command runs in (breaking.py)
    common: str = COMMON              # the flags every command of the case gets first
    seconds: float | None = None      # it must end within this many seconds (besides starting Python)
    applies: Callable | None = None   # () -> False where the case is not a bad input (a machine with CUDA)
    rewrites: tuple = ()              # control: files of the case's folder it is meant to rewrite (a stale cache)
    family: str = ""                  # the kind of input it breaks: its key in FAMILIES


T, X, P = "train", "extract", "predict"
W = lambda *words: tuple(words)
NAN = float("nan")

FAMILIES = {  # family -> {case name -> Case}
    "the features file": {
        "nan-test": Case(T, "NaN rows in the test features", "--features f.pt --method zeroshot --shots 2",
                         spoiled(rows("test", NAN)), expect=W("'test.features'", "3 of")),
        "zero-test": Case(T, "all-zero rows in the test features", "--features f.pt --method zeroshot --shots 2",
                          spoiled(rows("test", 0.0)), expect=W("'test.features'", "3 of")),
        "nan-val": Case(T, "NaN rows in the val features", "--features f.pt --method tip --search-val --shots 2",
                        spoiled(rows("val", NAN)), expect=W("'val.features'", "3 of")),
        "zero-val": Case(T, "all-zero rows in the val features", "--features f.pt --method zeroshot --shots 2",
                         spoiled(rows("val", 0.0)), expect=W("'val.features'", "3 of")),
        "no-text-positive": Case(T, "no `text.positive` in the features file", "--features f.pt --shots 2",
                                 spoiled(lambda d: d["text"].pop("positive")), expect=W("'text.positive'")),
        "no-train-labels": Case(T, "no `train.labels` in the features file", "--features f.pt --shots 2",
                                spoiled(lambda d: d["train"].pop("labels")), expect=W("'train.labels'")),
        "fewshot-out-of-range": Case(T, "a few-shot index out of range", "--features f.pt --shots 2",
                                     spoiled(lambda d: d["fewshot"][1].__setitem__((0, 0), 10**6)),
                                     expect=W("fewshot[1]")),
        "fewshot-wrong-class": Case(T, "few-shot rows listing other classes' images", "--features f.pt --shots 2",
                                    spoiled(lambda d: d["fewshot"][1].copy_(d["fewshot"][1].flip(0))),
                                    expect=W("row c must list images of class c")),
        "fewshot-bool": Case(T, "few-shot indices of type bool (a mask, not indices)", "--features f.pt --shots 2",
                             spoiled(lambda d: d["fewshot"].__setitem__(1, d["fewshot"][1].bool())),
                             expect=W("fewshot[1] must be an integer tensor")),
        "fewshot-no-shots": Case(T, "few-shot rows of zero shots", "--features f.pt --shots 2",
                                 spoiled(lambda d: d["fewshot"].__setitem__(1, d["fewshot"][1][:, :0])),
                                 expect=W("fewshot[1] must be an integer tensor")),
        "fewshot-no-seeds": Case(T, "few-shot subsets for no seed", "--features f.pt --shots 2",
                                 spoiled(lambda d: d.__setitem__("fewshot", {})), expect=W("'fewshot' must map")),
        "test-label-out-of-range": Case(T, "a test label of class 99 of 5", "--features f.pt --shots 2",
                                        spoiled(lambda d: d["test"]["labels"].__setitem__(0, 99)),
                                        expect=W("'test.labels' lie in")),
        "test-labels-bool": Case(T, "test labels of type bool", "--features f.pt --shots 2",
                                 spoiled(lambda d: d["test"].__setitem__("labels", d["test"]["labels"].bool())),
                                 expect=W("'test.labels' must be an integer")),
        "val-labels-short": Case(T, "one val label fewer than val rows", "--features f.pt --shots 2",
                                 spoiled(lambda d: d["val"].__setitem__("labels", d["val"]["labels"][:-1])),
                                 expect=W("'val.labels' has")),
        "negative-other-size": Case(T, "negative text features of another size than the positive ones",
                                    "--features f.pt --shots 2", spoiled(lambda d: d["text"].__setitem__(
                                        "negative", d["text"]["negative"][:, :5])), expect=W("'text.negative' is")),
        "train-features-2d": Case(T, "training features without their views dimension", "--features f.pt --shots 2",
                                  spoiled(lambda d: d["train"].__setitem__("features", d["train"]["features"][0])),
                                  expect=W("'train.features' must be")),
        "classnames-a-string": Case(T, "`classnames` a string of 5 letters for 5 classes", "--features f.pt",
                                    spoiled(lambda d: d.__setitem__("classnames", "abcde")),
                                    expect=W("'classnames' must be a list of strings")),
        "features-truncated": Case(T, "a truncated features `.pt`", "--features f.pt", cut("feats", "f.pt", 200),
                                   expect=W("truncated or not a file written by torch.save")),
        "features-empty": Case(T, "an empty features `.pt`", "--features f.pt", cut("feats", "f.pt", 0),
                               expect=W("truncated")),
        **{f"logit-scale-{name}": Case(T, f"a features file whose `logit_scale` is {shown}", "--features f.pt "
                                       "--shots 2", spoiled(lambda d, v=value: d.__setitem__("logit_scale", v)),
                                       expect=W("'logit_scale' must be a finite number above 0"))
           for name, value, shown in (("zero", 0.0, "0"), ("negative", -100.0, "-100"), ("nan", NAN, "NaN"),
                                      ("text", "100", 'the string "100"'), ("bool", True, "True"))},
        "test-split-empty": Case(T, "a features file with an empty test split", "--features f.pt --shots 2",
                                 spoiled(lambda d: d.__setitem__("test", {k: v[:0] for k, v in d["test"].items()})),
                                 expect=W("'test.features' is empty")),
        "zero-views": Case(T, "a features file with zero training views", "--features f.pt --shots 2",
                           spoiled(lambda d: d["train"].__setitem__("features", d["train"]["features"][:0])),
                           expect=W("'train.features' is empty")),
    },
    "numbers out of range": {
        **{name: Case(T, f"`{flags}`", f"--features {{feats}} {flags}", expect=W(words)) for name, flags, words in (
            ("epochs-negative", "--epochs -1", "--epochs: must be at least 0"),
            ("lr-zero", "--lr 0", "--lr: must be positive"),
            ("lr-negative", "--lr -0.1", "--lr: must be positive"),
            ("lr-nan", "--lr nan", "--lr: must be positive, got nan"),
            ("batch-size-zero", "--batch-size 0", "--batch-size: must be at least 1"),
            ("shots-zero", "--shots 0", "--shots: must be at least 1"),
            ("shots-negative", "--shots -2", "--shots: must be at least 1"),
            ("shots-fractional", "--shots 2.5", "--shots: must be an integer"),
            ("seed-huge", "--seeds 18446744073709551616", "--seeds: must be between 0 and"),
            ("alpha-nan", "--alpha nan", "--alpha: must be at least 0, got nan"),
            ("alpha-negative", "--alpha -1", "--alpha: must be at least 0"),
            ("beta-inf", "--beta-vp inf", "--beta-vp: must be at least 0, got inf"),
            ("bias-scale-minus-inf", "--bias-scale=-inf", "--bias-scale: must be at least 0"),
            ("gamma-zero", "--method tip --gamma 0", "--gamma: must be positive"),
            ("ratio-above-1", "--method clip-adapter --ratio 1.5", "--ratio: must be between 0 and 1"),
            ("n-ctx-zero", "--method coop --n-ctx 0", "--n-ctx"))},
        "encode-batch-size-zero": Case(X, "`--encode-batch-size 0`", "--dataset dtd --root {data} "
                                       "--encode-batch-size 0", expect=W("--encode-batch-size")),
        "workers-negative": Case(X, "`--workers -1`", "--dataset dtd --root {data} --workers -1",
                                 expect=W("--workers")),
        "precision-unknown": Case(X, "`--precision fp8`", "--dataset dtd --root {data} --precision fp8",
                                  expect=W("--precision")),
        "views-zero": Case(X, "`--views 0`", "--dataset dtd --views 0",
                           expect=W("argument --views: must be at least 1")),
        "views-not-a-number": Case(X, "`--views two`", "--dataset dtd --views two",
                                   expect=W("argument --views: must be an integer")),
        "seed-huge-extract": Case(X, "`--seeds 2^64`", "--dataset dtd --seeds 18446744073709551616",
                                  expect=W("argument --seeds: must be between 0 and")),
    },
    "the protocol and the methods": {
        "no-negatives": Case(T, "no negative text features, method hegraph", "--features f.pt --shots 2 --epochs 1",
                             spoiled(lambda d: d["text"].pop("negative")), expect=W("--no-negatives")),
        "hegraph-tn-no-negatives": Case(T, "`--method hegraph-tn --no-negatives`", "--features {feats} --method "
                                        "hegraph-tn --no-negatives", expect=W("cannot run with --no-negatives")),
        "other-dataset": Case(T, "`--features` of another dataset than `--dataset`",
                              "--features {feats} --dataset dtd", expect=W("holds 'synthetic', not --dataset 'dtd'")),
        "lr-diverges": Case(T, "`--lr 1e6`: the loss diverges", "--features {feats} --shots 4 --lr 1e6 --epochs 30 "
                                                                "--seeds 2", expect=W("diverged at seed 2, epoch",
                                                                                      "step", "--lr")),
        "lr-diverges-tip-f": Case(T, "`--lr 1e6` for tip-f: the loss diverges", "--features {feats} --method tip-f "
                                  "--shots 4 --lr 1e6 --epochs 30 --seeds 2", expect=W("diverged at seed 2, epoch",
                                                                                       "step", "--lr")),
        "shots-above-file": Case(T, "`--shots 8`, above the features file's max-shots 4",
                                 "--features {feats} --shots 8"),
        "shots-above-max-shots": Case(T, "`--shots 32` above `--max-shots 2`, extracting on demand",
                                      "--dataset dtd --root {data} --shots 32", expect=W("--max-shots 32"),
                                      check=no_file(FEATURES)),
        "search-val-zeroshot": Case(T, "`--method zeroshot --search-val`",
                                    "--features {feats} --method zeroshot --search-val --shots 2",
                                    expect=W("zeroshot has none")),
        "search-val-with-its-knob": Case(T, "`--search-val` beside `--alpha`, a knob it tunes for tip",
                                         "--features {feats} --method tip --search-val --alpha 2",
                                         expect=W("--alpha is a knob --search-val tunes for tip")),
        "search-val-with-lr": Case(T, "`--search-val` beside `--lr`, a knob it tunes for taskres",
                                   "--features {feats} --method taskres --search-val --lr 1e-3",
                                   expect=W("--lr is a knob --search-val tunes for taskres")),
        "setting-of-another-method": Case(T, "`--ratio 0.5` for hegraph (CLIP-Adapter's setting)",
                                          "--features {feats} --ratio 0.5",
                                          expect=W("--ratio sets nothing of hegraph (it configures clip-adapter)")),
        "unknown-dataset-train": Case(T, "an unknown `--dataset`", "--dataset fgvc",
                                      expect=W("unknown dataset 'fgvc'; choose one of: imagenet,")),
        "test-only-dataset": Case(T, "`--dataset imagenetv2`, a test-only set", "--dataset imagenetv2",
                                  expect=W("is a test-only set: train on imagenet and pass --eval-datasets "
                                           "imagenetv2")),
        "few-images": Case(T, "a class with fewer training images than `--max-shots`, extracting on demand",
                           "--dataset dtd --root data --max-shots 4 --shots 2", dataset(counts={"train": [5, 2, 6]}),
                           expect=W("class 1 ('class b 1') has 2 training images", "--allow-repeats")),
        "negative-template": Case(X, "`--negative-template` without `{}`", "--dataset dtd --root {data} "
                                  "--negative-template 'a photo of nothing.'", expect=W("--negative-template must "
                                                                                        "contain {}")),
    },
    "CoOp's CLIP text encoder": {
        "coop-no-settings": Case(T, "coop on features that record no CLIP (another tool's file)",
                                 "--features {feats} --method coop --shots 2"),
        "coop-checkpoint-gone": Case(T, "coop on features whose recorded `--clip-checkpoint` is gone",
                                     "--features f.pt --method coop --shots 2", clip_recorded(
                                         lambda s, case, fx: s.__setitem__("clip_checkpoint", str(case / "moved.pt")))),
        "coop-weights-gone": Case(T, "coop on features whose recorded `--pretrained` weights file is gone",
                                  "--features f.pt --method coop --shots 2", clip_recorded(
                                      lambda s, case, fx: s.update(backbone="ViT-B-32", clip_checkpoint=None,
                                                                   pretrained=str(case / "gone.safetensors")))),
        "coop-weights-changed": Case(T, "coop on features whose recorded checkpoint was replaced by other weights",
                                     "--features f.pt --method coop --shots 2", clip_recorded(weights_replaced)),
        "coop-init-and-n-ctx": Case(T, "`--coop-init` (4 tokens) with `--n-ctx 8`",
                                    "--features {dtd_features} --method coop --shots 2 --coop-init --n-ctx 8"),
        "coop-n-ctx-above-context": Case(T, "`--n-ctx 80`, above the text encoder's 77 tokens",
                                         "--features {dtd_features} --method coop --shots 2 --n-ctx 80"),
    },
    "checkpoints": {
        "eval-only-method": Case(T, "`--eval-only` with a conflicting `--method`",
                                 "--features {feats} --eval-only --load {ck} --method tip --seeds 1 2"),
        "eval-only-shots": Case(T, "`--eval-only` with a conflicting `--shots`",
                                "--features {feats} --eval-only --load {ck} --shots 4 --seeds 1"),
        "eval-only-mixed": Case(T, "`--eval-only` on a folder whose seeds disagree",
                                "--features {feats} --eval-only --load ck --seeds 1 2", checkpoints(mixed_seeds)),
        "checkpoint-truncated": Case(T, "a truncated checkpoint `.pt`", "--features {feats} --eval-only --load ck "
                                     "--seeds 1", checkpoints(lambda ck, fx: truncate(ck / "seed1.pt", 200)),
                                     expect=W("seed1.pt is truncated or not a file written by torch.save")),
        "checkpoint-empty": Case(T, "an empty checkpoint `.pt`", "--features {feats} --eval-only --load ck --seeds 1",
                                 checkpoints(lambda ck, fx: truncate(ck / "seed1.pt", 0))),
        "checkpoint-older-config": Case(T, "a checkpoint whose config lacks a field added since (weight_scale)",
                                        "--features {feats} --eval-only --load ck --seeds 1",
                                        checkpoints(older_config)),
        "checkpoint-nan": Case(T, "NaN weights in a checkpoint", "--features {feats} --eval-only --load ck --seeds 1",
                               checkpoint_changed(lambda c: c["state_dict"]["b_p"].fill_(NAN))),
        "checkpoint-wrong-shape": Case(T, "a checkpoint tensor of the wrong shape", "--features {feats} --eval-only "
                                       "--load ck --seeds 1", checkpoint_changed(
                                           lambda c: c["state_dict"].__setitem__("b_p",
                                                                                 c["state_dict"]["b_p"][:, :4]))),
        "checkpoint-extra-tensor": Case(T, "a checkpoint with a tensor the model does not have", "--features {feats} "
                                        "--eval-only --load ck --seeds 1", checkpoint_changed(
                                            lambda c: c["state_dict"].__setitem__("extra", torch.zeros(2)))),
        "checkpoint-other-classes": Case(T, "checkpoints of another dataset with the same shapes", "--features f.pt "
                                         "--eval-only --load ck --seeds 1", other_classes),
        "save-mixed": Case(T, "`--save` into a folder holding another method's checkpoints",
                           "--features {feats} --method hegraph --shots 2 --epochs 1 --save ck", checkpoints()),
        "checkpoint-renamed": Case(T, "`seed1.pt` renamed `seed2.pt`", "--features {feats} --eval-only --load ck "
                                   "--seeds 2", checkpoints(renamed_seed)),
        "checkpoint-seed-absent": Case(T, "`--eval-only --seeds 3` on a folder of seeds 1 and 2",
                                       "--features {feats} --eval-only --load {ck} --seeds 3"),
        "checkpoint-state-list": Case(T, "a model file whose state_dict is a list", "--features {feats} --eval-only "
                                      "--load ck --seeds 1", checkpoint_changed(
                                          lambda c: c.__setitem__("state_dict", list(c["state_dict"].values())))),
        "checkpoint-run-not-a-dict": Case(T, "a model file whose run is a string", "--features {feats} --eval-only "
                                          "--load ck --seeds 1",
                                          checkpoint_changed(lambda c: c.__setitem__("run", "hegraph-t"))),
        "checkpoint-older-layout": Case(T, "a checkpoint of an older train.py (no class names, text features, cache)",
                                        "--features {feats} --eval-only --load ck --seeds 1",
                                        checkpoints(older_checkpoint)),
        "checkpoint-other-images": Case(T, "features of the same classes and sizes, other few-shot images",
                                        "--features f.pt --eval-only --load ck --seeds 1", other_fewshot_images),
        "eval-only-config-flag": Case(T, "`--eval-only --load DIR --alpha 5`",
                                      "--features {feats} --eval-only --load {ck} --seeds 1 --alpha 5"),
        "eval-only-recipe-flag": Case(T, "`--eval-only --load DIR --epochs 3`",
                                      "--features {feats} --eval-only --load {ck} --seeds 1 --epochs 3"),
        "eval-only-save": Case(T, "`--eval-only --load DIR --save OTHER`",
                               "--features {feats} --eval-only --load {ck} --seeds 1 --save other"),
        "load-a-file": Case(T, "`--load DIR/seed1.pt`, a file", "--features {feats} --eval-only --load {ck}/seed1.pt"),
        "search-val-seed-without-val": Case(T, "`--search-val --seeds 1 2`, seed 2 without a validation subset",
                                            "--features f.pt --method tip --shots 2 --search-val --seeds 1 2",
                                            no_val_subset_for_seed_2),
    },
    "model files and predict.py": {
        "predict-no-model": Case(P, "`--model` a folder that does not exist", "--model absent {photo}"),
        "predict-empty-folder": Case(P, "`--model` a folder without model files", "--model folder {photo}",
                                     a_folder),
        "predict-features-as-model": Case(P, "a features file named `seed1.pt`", "--model model {photo}",
                                          features_as_model),
        "predict-state-list": Case(P, "a model file whose state_dict is a list", "--model model {photo}",
                                   model_changed(lambda m: m.__setitem__("state_dict", list(m["state_dict"])))),
        "predict-text-nan": Case(P, "NaN text features in a model file", "--model model {photo}",
                                 model_changed(lambda m: m["text"]["positive"].fill_(float("nan")))),
        "predict-other-format": Case(P, "a model file of another format", "--model model {photo}",
                                     model_changed(lambda m: m.__setitem__("format", "hegraphadapter-model-v0"))),
        "predict-unknown-method": Case(P, "a model file of a method this version lacks", "--model model {photo}",
                                       model_changed(lambda m: m["run"].__setitem__("method", "coop-next"))),
        "predict-renamed": Case(P, "`seed1.pt` renamed `seed3.pt`", "--model model {photo}",
                                model_copy(lambda f, fx: (f / "seed1.pt").rename(f / "seed3.pt"))),
        "predict-seed-absent": Case(P, "`--seed 4` of a folder holding seed 1", "--model {model} --seed 4 {photo}"),
        "predict-other-clip": Case(P, "`--clip-checkpoint` another CLIP of the same feature size",
                                   "--model {model} --clip-checkpoint {other_clip} {photo}"),
        "predict-clip-moved": Case(P, "the model's CLIP checkpoint no longer at its recorded path",
                                   "--model model {photo}", model_copy(moved_clip)),
        "predict-features-without-clip": Case(P, "a model of features that name no CLIP (synthetic) on an image",
                                              "--model {ck} {photo}"),
        "predict-unreadable": Case(P, "a folder of images none of which can be read", "--model {model} photos",
                                   unreadable_photos),
        "predict-no-images": Case(P, "an empty folder of images", "--model {model} folder", a_folder),
        "predict-top-k-zero": Case(P, "`--top-k 0`", "--model {model} --top-k 0 {photo}"),
        "predict-out-suffix": Case(P, "`--out p.txt`", "--model {model} --out p.txt {photo}"),
        "predict-out-in-model": Case(P, "`--out` inside the `--model` folder", "--model model --out model/p.csv "
                                     "{photo}", model_copy()),
    },
    "outputs": {
        "out-unwritable": Case(T, "an unwritable `--out` (its folder is a file)",
                               "--features {feats} --shots 2 --epochs 1 --out file/r.json", a_file("file"),
                               expect=W("cannot be written: ")),
        "save-unwritable": Case(T, "an unwritable `--save` (its parent is a file)",
                                "--features {feats} --shots 2 --epochs 1 --save file/ck", a_file("file"),
                                expect=W("cannot be written: ")),
        "out-is-the-features": Case(T, "`--out` the `--features` file itself", "--features f.pt --out f.pt --shots 2 "
                                    "--epochs 1", feats_copy, expect=W("is the --features file")),
        "out-is-a-folder": Case(T, "`--out` an existing folder", "--features {feats} --out folder --shots 2", a_folder,
                                expect=W("is a folder; give a file name")),
        "out-is-a-pipe": Case(T, "`--out` a named pipe (a device-like node)", "--features {feats} --out pipe --shots 2",
                              a_pipe, expect=W("not a regular file")),
        "out-in-the-dataset": Case(T, "`--out` inside the dataset folder", "--dataset dtd --root {data} --shots 2 "
                                   "--out {data}/dtd/results.json", expect=W("is the dataset folder")),
        "out-name-too-long": Case(T, "`--out` whose name is too long for the file system",
                                  "--features {feats} --shots 2 "
                                  "--out " + "r" * 250 + ".json", expect=W("the name is too long")),
        "save-is-a-file": Case(T, "`--save` an existing file", "--features {feats} --shots 2 --save file",
                               a_file("file"), expect=W("is a file; give a folder")),
        "features-dir-full": Case(X, "a disk without room for the features file (1 kB free)",
                                  "--dataset dtd --root {data}", within=disk_free(1000),
                                  expect=W("no room for features/", "it needs", "MiB", "--features-dir")),
    },
    "datasets and split files": {
        "missing-root": Case(X, "no dataset folder and no features file", "--dataset dtd --root absent",
                             expect=W("dataset folder not found", "absent/dtd", "docs/datasets.md")),
        "split-file-missing": Case(X, "a dataset folder without its split file", "--dataset dtd --root data",
                                   dataset(then=without_split_file), expect=W("split file not found",
                                                                              "split_zhou_DescribableTextures.json")),
        "unknown-dataset-extract": Case(X, "an unknown `--dataset`", "--dataset fgvc --root {data}",
                                        expect=W("argument --dataset: unknown dataset 'fgvc'; choose one of:")),
        "fractional-label": Case(X, "a fractional label (1.7) in a split file", "--dataset dtd --root data",
                                 dataset(then=fractional_label), expect=W("labels that are not integers, e.g. 1.7")),
        **{name: Case(X, f"a class with no training images{extra}", f"--dataset dtd --root data{flag}",
                      dataset(counts={"train": [5, 0, 6]}), expect=W("class 1 ('class b 1') has no training images"),
                      avoid=W("--allow-repeats is")) for name, extra, flag in (
            ("empty-class", "", ""), ("empty-class-allow-repeats", ", `--allow-repeats`", " --allow-repeats"))},
        "unreadable-images": Case(X, "3 unreadable images (missing, text, empty)", "--dataset dtd --root data",
                                  dataset(then=unreadable_images), expect=W("3 of 19 images cannot be read",
                                                                            "(missing)", "(not an image)")),
        "image-cut-after-header": Case(X, "a test JPEG cut short after its header (it fails only when decoded)",
                                       "--dataset dtd --root data", dataset(then=truncated_image),
                                       expect=W("cannot read image", "class b_1/test_0.jpg")),
        "split-image-twice": Case(X, "a split file listing a training image in the test split too",
                                  "--dataset dtd --root data", split_changed(lambda s: s["test"].append(s["train"][0])),
                                  expect=W("lists image class a_0/train_0.jpg in train (label 0) and in test")),
        "split-image-two-labels": Case(X, "a split file listing a training image again with another label",
                                       "--dataset dtd --root data", split_changed(lambda s: s["train"].append(
                                           [s["train"][0][0], 1, "class b_1"])),
                                       expect=W("lists image class a_0/train_0.jpg in train")),
        "split-two-names": Case(X, "a split file giving one label two class names", "--dataset dtd --root data",
                                split_changed(lambda s: s["train"].append([s["train"][5][0], 0, "another name"])),
                                expect=W("gives label 0 two class names")),
        "split-two-labels": Case(X, "a split file giving one class name two labels", "--dataset dtd --root data",
                                 split_changed(lambda s: [e.__setitem__(2, "class a_0") for part in s.values()
                                                          for e in part if e[1] == 2]),
                                 expect=W("gives class 'class a_0' two labels, 0 and 2")),
        **{name: Case(X, f"a split file whose image path is {shown}", "--dataset dtd --root data",
                      split_changed(lambda s, e=entry: s["train"].append(list(e))),
                      expect=W("whose image path or class name is not a name")) for name, shown, entry in (
            ("split-path-a-number", "a number", [7, 0, "class a_0"]),
            ("split-path-null", "null", [None, 0, "class a_0"]),
            ("split-classname-a-list", "a path with a list as class name", ["class a_0/v.jpg", 0, ["class a_0"]]))},
    },
    "folders of your own": {
        "folder-unknown-name": Case(T, "`--dataset widgets`: no such key and no such folder", "--dataset widgets",
                                    expect=W("unknown dataset 'widgets'", "or give a folder of class subfolders")),
        "folder-download": Case(T, "`--download` with a folder of your own", "--dataset mine --shots 2 --download",
                                image_folder(), expect=W("--download fetches the benchmark datasets", "drop "
                                                                                                       "--download")),
        "folder-template": Case(T, "`--template` without `{}`", "--dataset mine --shots 1 --template "
                                "'a photo of a cat.'", image_folder(), expect=W("--template must contain {}")),
        "folder-few-images": Case(T, "a class folder with fewer training images than `--max-shots`",
                                  "--dataset mine --shots 1 --max-shots 16", image_folder(),
                                  expect=W("has 5 training images, fewer than the 16 needed", "--max-shots")),
        "folder-unreadable-image": Case(X, "a text file named .jpg in a class folder", "--dataset mine",
                                        image_folder(lambda f: (f / "red" / "0.jpg").write_text("not an image")),
                                        expect=W("cannot be read", "red/0.jpg (not an image)")),
        "folder-class-two-images": Case(X, "a class folder with 2 images", "--dataset mine", touched(
            "a/0.jpg", "a/1.jpg", "a/2.jpg", "b/0.jpg", "b/1.jpg"), expect=W("mine/b holds 2 images", "at least 3")),
        "folder-class-no-images": Case(X, "a class folder with no images", "--dataset mine", touched(
            "a/0.jpg", "a/1.jpg", "a/2.jpg", "b/notes.txt"), expect=W("mine/b holds no images (.bmp, ")),
        "folder-no-classes": Case(X, "images and no class folders", "--dataset mine", touched("one.jpg", "two.jpg"),
                                  expect=W("has no class subfolders (it holds 2 images directly)")),
        "folder-two-folders-one-class": Case(X, "class folders red_panda and red-panda", "--dataset mine", touched(
            *[f"red_panda/{i}.jpg" for i in range(3)], *[f"red-panda/{i}.jpg" for i in range(3)]),
            expect=W("both give the class name 'red panda'")),
        "folder-class-no-name": Case(X, "a class folder named `_`", "--dataset mine", touched(
            *[f"_/{i}.jpg" for i in range(3)]), expect=W("mine/_ gives no class name")),
        "folder-dtd-beside-dtd": Case(X, "a folder named dtd (`--dataset ./dtd`) beside the benchmark dtd's features "
                                      "file of the same name", "--dataset ./dtd", dtd_folder_beside_dtd,
                                      expect=W("holds the features of the benchmark dtd", "the folder",
                                               "choose another --features-dir"), avoid=W("--overwrite")),
    },
    "paths that stay inside the dataset": {
        "split-dotdot": Case(X, "a split-file path with `..` out of the images folder", "--dataset dtd --root data",
                             split_paths("../../outside.jpg"),
                             expect=W("leave its images folder", "../../outside.jpg")),
        "split-dotdot-back-in": Case(X, "a split-file path with `..` that comes back in", "--dataset dtd --root data",
                                     split_paths("class b_1/../class a_0/train_0.jpg"),
                                     expect=W("leave its images folder", "no '..'")),
        "split-absolute": Case(X, "an absolute split-file path (to an image of the dataset)", "--dataset dtd --root "
                               "data", split_paths(lambda case: str(case / "data/dtd/images/class a_0/train_1.jpg")),
                               expect=W("leave its images folder", "not absolute")),
        "split-home": Case(X, "a split-file path starting with `~`", "--dataset dtd --root data",
                           split_paths("~/outside.jpg"), expect=W("leave its images folder")),
        "folder-class-alias": Case(X, "a class folder that is a link to another class folder", "--dataset mine",
                                   image_folder(link("teal", "green")),
                                   expect=W("mine/teal is a link to", "the images of class folder", "mine/green")),
        "folder-class-alias-inside": Case(X, "a class folder that is a link into another class folder",
                                          "--dataset mine", image_folder(lambda f: (os.mkdir(f / "red" / "dark"),
                                                                                   link("maroon", "red/dark")(f))),
                                          expect=W("mine/maroon is a link to", "mine/red")),
        "folder-class-the-dataset": Case(X, "a class folder that is a link to the dataset folder", "--dataset mine",
                                         image_folder(link("all", ".")), expect=W("holds the dataset itself")),
        "folder-link-up-the-tree": Case(X, "control: a link in a class folder to the dataset folder (up the tree)",
                                        "--dataset mine", image_folder(link("red/up", ".")), control=True,
                                        check=warned("1 links in", "red/up ->", file="features/mine_"
                                                     + FEATURES.split("_", 1)[1], paths=none_under("red/up"))),
        "folder-link-sideways": Case(X, "control: a link in a class folder to another class folder", "--dataset mine",
                                     image_folder(link("red/greens", "green")), control=True,
                                     check=warned("red/greens ->", file="features/mine_" + FEATURES.split("_", 1)[1],
                                                  paths=none_under("red/greens"))),
        "folder-link-out": Case(X, "control: a link in a class folder to images outside the dataset",
                                "--dataset mine", image_folder(link_out), control=True,
                                check=warned("red/more ->", "elsewhere", file="features/mine_"
                                             + FEATURES.split("_", 1)[1], paths=none_under("red/more"))),
        "folder-loop-in-a-class": Case(X, "control: a link in a class folder to that class folder (a loop)",
                                       "--dataset mine", image_folder(link("red/again", "red")), control=True,
                                       check=warned("red/again ->", file="features/mine_" + FEATURES.split("_", 1)[1],
                                                    paths=none_under("red/again"))),
        "folder-image-twice": Case(X, "control: an image reached twice (a link to it in its class folder)",
                                   "--dataset mine", image_folder(image_twice), control=True,
                                   check=silent("features/mine_" + FEATURES.split("_", 1)[1],
                                                paths=once("red/0.jpg", "red/again.jpg"))),
        "folder-features-dir-inside": Case(X, "control: `--dataset .` with `--features-dir features` inside it, "
                                           "holding a file of an earlier run", "--dataset .", classes_here,
                                           control=True, check=classes_here_only),
    },
    "downloads and archives": {
        **{name: Case(X, f"a downloaded {kind} whose member {what}", DOWNLOAD, served_archive(member, kind),
                      within=serving(), expect=W("would write outside", words), seconds=30)
           for name, kind, what, member, words in (
               ("tar-dotdot", "tar", "is `../../../ESCAPED_BY_TAR`", tar_member("../../../ESCAPED_BY_TAR"),
                "'../../../ESCAPED_BY_TAR'"),
               ("tar-dotdot-inside", "tar", "is `dtd/../../ESCAPED`", tar_member("dtd/../../ESCAPED"),
                "'dtd/../../ESCAPED'"),
               ("tar-absolute", "tar", "has an absolute name", tar_member("/tmp/ESCAPED_BY_TAR"), "absolute name"),
               ("tar-link-out", "tar", "is a link out of the folder",
                tar_member("dtd/images/x.jpg", tarfile.SYMTYPE, "../../../../outside"), "dtd/images/x.jpg"),
               ("tar-link-absolute", "tar", "is a link to /etc/passwd", tar_member(
                   "dtd/images/passwd.jpg", tarfile.SYMTYPE, "/etc/passwd"), "dtd/images/passwd.jpg"),
               ("tar-hardlink-out", "tar", "is a hard link to /etc/passwd", tar_member(
                   "dtd/images/hard.jpg", tarfile.LNKTYPE, "/etc/passwd"), "dtd/images/hard.jpg"),
               ("tar-fifo", "tar", "is a named pipe", tar_member("dtd/images/pipe.jpg", tarfile.FIFOTYPE),
                "device or pipe"),
               ("tar-device", "tar", "is a character device", tar_member("dtd/images/dev.jpg", tarfile.CHRTYPE),
                "device or pipe"),
               ("zip-dotdot", "zip", "is `../../../ESCAPED_BY_ZIP`", zip_member("../../../ESCAPED_BY_ZIP"),
                "'../../../ESCAPED_BY_ZIP'"),
               ("zip-absolute", "zip", "has an absolute name", zip_member("/tmp/ESCAPED_BY_ZIP"), "absolute name"),
               ("zip-link", "zip", "is a link", zip_member("dtd/images/x.jpg", 0o120777, b"/etc/passwd"), "a link"))},
        "download-hand-placed-bad": Case(X, "an archive put by hand in the download folder, of another checksum",
                                         DOWNLOAD, hand_placed("dtd-r1.0.1.tar.gz"), within=serving(),
                                         expect=W("dtd.download/dtd-r1.0.1.tar.gz", "put by hand", "left there for you "
                                                                                                   "to inspect")),
        "download-offline": Case(X, "`--download` without a network", DOWNLOAD, served_archive(), within=no_network,
                                 expect=W("cannot reach", "listed above"), seconds=30, check=listed(
                                     "2 of 2 files are still needed", "{case}/data/dtd.download/"
                                     "split_zhou_DescribableTextures.json", "{case}/data/dtd.download/"
                                     "dtd-r1.0.1.tar.gz", "bytes, md5 ")),
        "download-disk-full": Case(X, "`--download` onto a disk with 1 kB free", DOWNLOAD, served_archive(),
                                   within=both(serving(), disk_free(1000)),
                                   expect=W("no room for", "dtd.download", "it needs", "--root")),
        "download-incomplete-folder": Case(X, "`--download` when the dataset folder is there but incomplete",
                                           DOWNLOAD, lambda case, fx: (case / "data/dtd/images").mkdir(parents=True),
                                           expect=W("exists but does not load", "split file not found",
                                                    "move it away and rerun")),
        **{f"download-{key}": Case(X, f"`--download` of {key}, which has no public download",
                                   f"--dataset {key} --root data --download", expect=W("has no public download"),
                                   check=listed("  1. ", "data/" + folder)) for key, folder in (
            ("imagenet", "imagenet"), ("stanford_cars", "stanford_cars"), ("imagenet-sketch", "imagenet-sketch"))},
    },
    "weights that must load": {
        "clip-checkpoint-nan": Case(X, "a `--clip-checkpoint` with NaN weights", "--dataset dtd --root {data} "
                                    "--clip-checkpoint clip.pt", clip_changed(lambda s: s["visual.proj"].fill_(NAN)),
                                    expect=W("clip.pt", "NaN or infinite values", "visual.proj")),
        "clip-checkpoint-inf": Case(X, "a `--clip-checkpoint` with an infinite weight", "--dataset dtd --root {data} "
                                    "--clip-checkpoint clip.pt", clip_changed(
                                        lambda s: s["ln_final.weight"].__setitem__(0, float("inf"))),
                                    expect=W("NaN or infinite values", "ln_final.weight")),
        "clip-checkpoint-missing-tensor": Case(X, "a `--clip-checkpoint` without one of its tensors", "--dataset dtd "
                                               "--root {data} --clip-checkpoint clip.pt", clip_changed(
                                                   lambda s: s.pop("visual.ln_post.weight")),
                                               expect=W("clip.pt", "visual.ln_post.weight")),
        "clip-checkpoint-text": Case(X, "a text file as `--clip-checkpoint`", "--dataset dtd --root {data} "
                                     "--clip-checkpoint clip.txt", lambda case, fx: (case / "clip.txt").write_text(
                                         "model: ViT-B/32\n"), expect=W("truncated or not a file written by "
                                                                        "torch.save")),
        "local-dir-no-weights": Case(X, "a `local-dir:` folder with its config and no weights file",
                                     "--dataset dtd --root {data} --backbone local-dir:oc", local_dir(no_weights),
                                     common=NO_CLIP, expect=W("no weights file", "random weights"), avoid=W("hub")),
        "local-dir-nan": Case(X, "a `local-dir:` folder whose weights hold NaN", "--dataset dtd --root {data} "
                              "--backbone local-dir:oc", local_dir(weights_changed(
                                  lambda s: s["visual.proj"].fill_(NAN))), common=NO_CLIP,
                              expect=W("open_clip_model.safetensors", "NaN or infinite values"), avoid=W("hub")),
        "local-dir-missing-tensor": Case(X, "a `local-dir:` folder whose weights lack a tensor", "--dataset dtd "
                                         "--root {data} --backbone local-dir:oc", local_dir(weights_changed(
                                             lambda s: s.pop("visual.proj"))), common=NO_CLIP,
                                         expect=W("does not fit", "1 missing tensors (e.g. visual.proj)"),
                                         avoid=W("hub")),
        "local-dir-unexpected-tensor": Case(X, "a `local-dir:` folder whose weights have a tensor too many",
                                            "--dataset dtd --root {data} --backbone local-dir:oc", local_dir(
                                                weights_changed(lambda s: s.__setitem__("extra.w", torch.zeros(2)))),
                                            common=NO_CLIP,
                                            expect=W("does not fit", "unexpected tensors (e.g. extra.w)"),
                                            avoid=W("hub")),
        "local-dir-other-shape": Case(X, "a `local-dir:` folder whose config is of another size than its weights",
                                      "--dataset dtd --root {data} --backbone local-dir:oc", local_dir(config_text(
                                          json.dumps({**TINY_OPEN_CLIP, "model_cfg": {
                                          **TINY_OPEN_CLIP["model_cfg"], "embed_dim": 16}}))), common=NO_CLIP,
                                      expect=W("does not fit", "of another shape"), avoid=W("hub")),
        "local-dir-no-config": Case(X, "a `local-dir:` folder without open_clip_config.json", "--dataset dtd --root "
                                    "{data} --backbone local-dir:oc", local_dir(lambda f: (
                                        f / "open_clip_config.json").unlink()), common=NO_CLIP,
                                    expect=W("holds no open_clip_config.json"), avoid=W("hub")),
        "local-dir-bad-json": Case(X, "a `local-dir:` folder whose config is not json", "--dataset dtd --root {data} "
                                   "--backbone local-dir:oc", local_dir(config_text("{model_cfg: ")), common=NO_CLIP,
                                   expect=W("open_clip_config.json is not an open_clip config", "JSONDecodeError"),
                                   avoid=W("hub")),
        "local-dir-no-model-cfg": Case(X, "a `local-dir:` folder whose config has no `model_cfg`", "--dataset dtd "
                                       "--root {data} --backbone local-dir:oc", local_dir(config_text('{"cfg": 1}')),
                                       common=NO_CLIP, expect=W("has no 'model_cfg'"), avoid=W("hub")),
        "default-model-offline": Case(X, "the default model (RN50) without a network or a cached copy",
                                      "--dataset dtd --root {data}", common=NO_CLIP, within=hub(offline_flag=False),
                                      seconds=10, expect=W("cannot load CLIP RN50", "does not answer", "RN50.pt",
                                                           "--clip-checkpoint PATH")),
        "default-model-hf-offline": Case(X, "the default model with HF_HUB_OFFLINE=1 and no cached copy",
                                         "--dataset dtd --root {data}", common=NO_CLIP, within=hub(offline_flag=True),
                                         seconds=10, expect=W("HF_HUB_OFFLINE is set", "RN50.pt",
                                                              "--clip-checkpoint PATH")),
        "tag-offline": Case(X, "an open_clip tag without a network or a cached copy", "--dataset dtd --root {data} "
                            "--backbone ViT-B-32 --pretrained laion2b_s34b_b79k", common=NO_CLIP,
                            within=hub(offline_flag=False), seconds=10,
                            expect=W("open_clip_pytorch_model.bin", "--pretrained PATH")),
        "hf-hub-offline": Case(X, "`--backbone hf-hub:ORG/REPO` without a network or a cached copy", "--dataset dtd "
                               "--root {data} --backbone hf-hub:org/no-such-model", common=NO_CLIP,
                               within=hub(offline_flag=True), seconds=10, expect=W("open_clip_config.json",
                                                                                   "--backbone local-dir:FOLDER")),
        "backbone-unknown": Case(X, "`--backbone ViT-B-61`", "--dataset dtd --root {data} --backbone ViT-B-61",
                                 common=NO_CLIP,
                                 expect=W("--backbone ViT-B-61: not one of OpenAI's names (RN50, RN101")),
        "backbone-no-default-weights": Case(X, "`--backbone ViT-B-16-SigLIP` without `--pretrained`",
                                            "--dataset dtd --root {data} --backbone ViT-B-16-SigLIP", common=NO_CLIP,
                                            expect=W("has no default weights: pass --pretrained with one of its tags "
                                                     "(webli)")),
        "pretrained-unknown-tag": Case(X, "`--pretrained laion5b`, no tag of ViT-B-16", "--dataset dtd --root {data} "
                                       "--backbone ViT-B-16 --pretrained laion5b", common=NO_CLIP,
                                       expect=W("--pretrained laion5b is neither a weights file nor a tag of "
                                                "ViT-B-16")),
        "backbone-not-the-checkpoints": Case(X, "`--backbone RN50` with a ViT `--clip-checkpoint`",
                                             "--dataset dtd --root {data} --backbone RN50",
                                             expect=W("--backbone RN50 does not match --clip-checkpoint", "whose "
                                                      "weights are a ViT-l1-w64-p16-32px-d32: drop --backbone")),
        "pretrained-with-checkpoint": Case(X, "`--pretrained openai` with a `--clip-checkpoint`",
                                           "--dataset dtd --root {data} --pretrained openai",
                                           expect=W("--pretrained openai names weights for --backbone",
                                                    "drop one of them")),
        "pretrained-with-hf-hub": Case(X, "`--pretrained` with `--backbone hf-hub:ORG/REPO`", "--dataset dtd --root "
                                       "{data} --backbone hf-hub:org/repo --pretrained laion2b_e16", common=NO_CLIP,
                                       expect=W("--backbone hf-hub:org/repo brings its own weights; drop "
                                                "--pretrained")),
    },
    "nothing blocks": {
        "features-a-fifo": Case(T, "`--features` a named pipe", "--features pipe.pt", fifo("pipe.pt"), seconds=30,
                                expect=W("named pipe (FIFO)", "not a regular file")),
        "clip-checkpoint-a-fifo": Case(X, "a `--clip-checkpoint` that is a named pipe", "--dataset dtd --root {data} "
                                       "--clip-checkpoint pipe.pt", fifo("pipe.pt"), seconds=30,
                                       expect=W("--clip-checkpoint", "named pipe")),
        "features-at-output-a-fifo": Case(X, "a named pipe at the features file's path", "--dataset dtd --root {data}",
                                          fifo(FEATURES), seconds=30, expect=W("named pipe", "not a regular file")),
        "download-trickle": Case(X, "a host that trickles the archive (one byte every 50 ms)", DOWNLOAD,
                                 served_archive(), within=serving("trickle", **FAST), seconds=20,
                                 expect=W("is too slow", "past its deadline")),
        "download-silent": Case(X, "a host that sends the headers and then nothing", DOWNLOAD, served_archive(),
                                within=serving("silent", **FAST), seconds=20, expect=W("stalled", "nothing arrived")),
        "download-no-answer": Case(X, "a host that answers only after 3 s", DOWNLOAD, served_archive(),
                                   within=serving("stall", **FAST), seconds=20, expect=W("stalled: no answer")),
        "image-a-fifo": Case(X, "a test image that is a named pipe", "--dataset dtd --root data",
                             dataset(then=test_image_a_fifo), seconds=30,
                             expect=W("class a_0/test_0.jpg (a named pipe (FIFO), not a regular file)")),
        "split-file-a-fifo": Case(X, "a split file that is a named pipe", "--dataset dtd --root data",
                                  dataset(then=split_file_a_fifo), seconds=30, expect=W("split file", "named pipe")),
        "prompts-a-fifo": Case(X, "`--prompts` a named pipe", "--dataset dtd --root {data} --prompts pipe.json",
                               fifo("pipe.json"), seconds=30, expect=W("prompts file", "named pipe")),
        "folder-fifo": Case(X, "control: a named pipe named .jpg in a class folder", "--dataset mine",
                            image_folder(folder_fifo), control=True, seconds=30,
                            check=warned("red/pipe.jpg", "named pipe", file="features/mine_"
                                         + FEATURES.split("_", 1)[1], paths=none_under("red/pipe"))),
    },
    "one line that names the cause": {
        "nan-tiff": Case(X, "control: a float TIFF with NaN and infinite pixels in the test split",
                         "--dataset dtd --root data", dataset(then=nan_tiff), control=True,
                         check=warned("1 of 8 images of dtd test", "NaN or infinite pixels, taken as black",
                                      "class a_0/test_nan.tif")),
        "huge-image": Case(X, "control: images above PIL's decompression-bomb limit (lowered to 1,000 pixels)",
                           "--dataset dtd --root {data}", within=pil_limit(1000), control=True,
                           check=warned("19 images are very large", "1,000")),
        "image-too-huge": Case(X, "images above twice PIL's limit (lowered to 500 pixels), which PIL refuses",
                               "--dataset dtd --root {data}", within=pil_limit(500),
                               expect=W("too large", "resize it")),
        "class-folder-not-utf8": Case(X, "a class folder whose name is Latin-1 bytes, not UTF-8", "--dataset mine",
                                      image_folder(latin1_class), expect=W("caf\\xe9", "not valid UTF-8",
                                                                           "rename the folder")),
        "dataset-folder-not-utf8": Case(T, "control: a dataset folder whose name is Latin-1 bytes, trained on",
                                        f"--dataset {NOT_UTF8}x --shots 2 --epochs 0 --out out.json", image_folder(
                                            name=f"{NOT_UTF8}x"), control=True, check=results_json_of(0)),
        "image-name-not-utf8": Case(X, "control: an image whose name is Latin-1 bytes", "--dataset mine",
                                    image_folder(latin1_image), control=True,
                                    check=silent("features/mine_" + FEATURES.split("_", 1)[1],
                                                 classes=["blue", "green", "red"])),
        "device-cuda-train": Case(T, "`--device cuda` on a machine without CUDA", "--features {feats} --device cuda",
                                  applies=NO_CUDA, expect=W("CUDA is not available")),
        "device-cuda-0": Case(T, "`--device cuda:0` on a machine without CUDA", "--features {feats} --device cuda:0",
                              applies=NO_CUDA, expect=W("CUDA is not available")),
        "device-cuda-extract": Case(X, "`--device cuda` on a machine without CUDA", "--dataset dtd --root {data} "
                                    "--device cuda", applies=NO_CUDA, expect=W("--device cuda", "CUDA is not available "
                                                                               "on this machine"),
                                    avoid=W("--clip-checkpoint")),
        "device-cuda-1-extract": Case(X, "`--device cuda:1` on a machine without CUDA", "--dataset dtd --root {data} "
                                      "--device cuda:1", applies=NO_CUDA, expect=W("CUDA is not available")),
        "device-meta": Case(T, "`--device meta`", "--features {feats} --device meta", expect=W("not on meta")),
        "device-mps": Case(T, "`--device mps` on a machine without MPS", "--features {feats} --device mps",
                           applies=NO_MPS, expect=W("MPS is not")),
        "device-xpu": Case(X, "`--device xpu`", "--dataset dtd --root {data} --device xpu", expect=W("not on xpu")),
        "device-npu": Case(T, "`--device npu`, no torch device", "--features {feats} --device npu",
                           expect=W("not a torch device")),
        "device-gpu-extract": Case(X, "`--device gpu`, no torch device", "--dataset dtd --root {data} --device gpu",
                                   expect=W("--device gpu", "is not a torch device")),
    },
    "reusing a features file": {
        "absent-root-other-settings": Case(T, "absent `--root`, an existing features file made with `--views 2`",
                                           "--dataset dtd --root absent --views 3 --shots 2", copied_features),
        "features-before-open-clip": Case(T, "a features file extracted with OpenAI's clip package, before open_clip",
                                          "--dataset dtd --root {data} --shots 2", features_before_open_clip),
        "features-at-output-empty": Case(X, "an empty file at the features file's path", "--dataset dtd --root {data}",
                                         cut("feats", FEATURES, 0), expect=W("is truncated", "--overwrite")),
        "other-weights": Case(X, "an existing features file made with other weights of the same architecture "
                              "(another `--clip-checkpoint`)", "--dataset dtd --root {data} --clip-checkpoint other.pt",
                              other_checkpoint),
    },
    "stale features (controls: redone, never reused)": {
        "changed-image": Case(X, "control: an image drawn anew under its name (size and mtime kept) since the features "
                              "were made", "--dataset dtd --root data --clip-checkpoint clip.pt", changed_image,
                              control=True, check=as_fresh(), rewrites=(FEATURES,)),
        "replaced-checkpoint": Case(X, "control: the `--clip-checkpoint` replaced by other weights at its path",
                                    "--dataset dtd --root data --clip-checkpoint clip.pt", replaced_checkpoint,
                                    control=True, check=as_fresh(), rewrites=(FEATURES,)),
        "folder-elsewhere": Case(X, "control: a folder of the same name elsewhere, one picture other",
                                 "--dataset b/mine --clip-checkpoint clip.pt", folder_elsewhere, control=True,
                                 check=as_fresh("b/mine", "."), rewrites=(f"features/mine_{TINY_NAMES['vit']}.pt",)),
        "prompt-change": Case(X, "control: other prompts (`--template`) on an existing features file",
                              "--dataset dtd --root data --clip-checkpoint clip.pt --template 'a close-up of {{}}.'",
                              extracted(), control=True, check=prompts_added, rewrites=(FEATURES,)),
    },

    "controls (not bad inputs: they must succeed)": {
        "eval-only-without-negatives": Case(T, "control: a model trained with negatives, evaluated on a file "
                                            "without them (it carries its own)", "--features f.pt --eval-only "
                                            "--load full --seeds 2 --out r.json", no_negatives_file, control=True,
                                            check=same_accuracy_without_negatives),
        "predict-an-image": Case(P, "control: predict.py on an image, `--out p.json`", "--model {model} --out p.json "
                                 "--top-k 2 {photo}", control=True, check=predictions_json),
        "16-bit-png": Case(X, "control: a 16-bit PNG (and its 8-bit twin) in the test split",
                           "--dataset dtd --root data",
                           dataset(then=sixteen_bit_png), control=True, check=same_16_and_8_bit_features),
        "epochs-zero": Case(T, "control: `--epochs 0` evaluates the starting point; `~` in `--out=~/control.json`",
                            "--features {feats} --shots 2 --epochs 0 --out=~/control.json", control=True,
                            check=results_json),
    },
}

CASES = {name: dataclasses.replace(case, family=family, expect=tuple(case.expect), avoid=tuple(case.avoid))
         for family, cases in FAMILIES.items() for name, case in cases.items()}


# -----------------------------------------------------------------------------
# running a case and judging what it did

def decode(output: bytes):
    """A process's output as text, its "\r" kept (text=True would turn each "\r" into a line break)."""
    return output.decode("utf-8", "replace")


def shown_lines(text):
    """What a terminal shows of a stream: per "\\n"-line, the text after its last "\\r", if any."""
    return [shown for line in text.split("\n") if (shown := line.split("\r")[-1].strip())]


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@functools.cache
def flags_of(script):
    """The flags a script's --help lists: an error must only name those (no dead ends)."""
    parser = {T: cli.train_parser, X: cli.extract_parser, P: classify.predict_parser}[script]()
    return set(FLAG.findall(parser.format_help()))


def snapshot(*folders):
    """{path: sha256} of every file under the folders."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def complete(path):
    """True if a new file is whole: a .pt loads with torch, a .json parses; other files are not judged."""
    try:
        if path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        return True
    except Exception:
        return False


def files_lost(before, after, root, rewritten=()):
    """Pre-existing files changed or deleted (but those `rewritten` on purpose, if complete), hidden .tmp left, new
    files that are half-written or stray (a download's staging folder ROOT/FOLDER.download/ keeps the files it
    fetched and checked, for the rerun)."""
    name = lambda p: str(p.relative_to(root))
    lost = [f"changed {name(p)}" if p in after else f"deleted {name(p)}"
            for p, digest in before.items() if after.get(p) != digest and not (p in rewritten and complete(p))]
    for p in after.keys() - before.keys():
        if p.name.endswith(".tmp"):
            lost.append(f"left {name(p)}")
        elif p.name.startswith(".") and p.name.endswith(".lock") and p.stat().st_size == 0:
            continue                                            # file_lock's empty lock file: documented
        elif p.parent.name.endswith(".download"):
            continue                                            # a download's checked files, kept for the rerun
        elif p.suffix not in (".pt", ".json") or not complete(p):
            lost.append(f"half-written or stray {name(p)}")
    return sorted(lost)


def command(case, fx):
    """The arguments of a case's command, after the script: COMMON [--out results.json] ARGS (predict.py:
    PREDICT_COMMON ARGS)."""
    common = PREDICT_COMMON if case.script == P else case.common + (" --out results.json" if case.script == T else "")
    return shlex.split(f"{common} {case.args}".format_map(fx))


@dataclass
class Outcome:
    """What one case did, and whether that is what the project promises."""
    name: str
    case: Case
    argv: list                                    # the command's arguments, after the script
    folder: Path
    rc: int = None
    errors: list = field(default_factory=list)    # shown stderr lines that start with "error:"
    others: list = field(default_factory=list)    # the other shown stderr lines
    lost: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # why it is not as promised (empty: it is)
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0                          # how long the command ran


def prepare(name, case, folder, fx):
    """Make the case's folder, its broken inputs and its sentinels; returns its Outcome, to be run."""
    folder.mkdir(parents=True)
    (folder / "features").mkdir()
    (folder / "results.json").write_bytes(SENTINEL)               # train.py's --out, unless the case says other
    (folder / "features" / "previous.pt").write_bytes(SENTINEL)   # another file in the extraction's folder
    if case.prepare:
        case.prepare(folder, fx)
    return Outcome(name, case, command(case, fx), folder)


def new_features(before, folder):
    """Features files an extraction wrote (a bad input must write none)."""
    return [p.name for p in (folder / "features").glob("*.pt") if p.is_file() and p not in before]


def judge(outcome, rc, stdout, stderr, before, fx, seconds=0.0, startup=0.0):
    """What the case's command did (exit code, output, time) and the files after it, against what is promised.
    startup: the seconds a process takes before it reads its first flag (not counted against case.seconds)."""
    folder, case = outcome.folder, outcome.case
    outcome.rc, outcome.stdout, outcome.stderr, outcome.seconds = rc, stdout, stderr, seconds
    shown = shown_lines(outcome.stderr)
    outcome.errors = [line for line in shown if line.startswith("error:")]
    outcome.others = [line for line in shown if not line.startswith("error:")]
    outcome.lost = files_lost(before, snapshot(folder, fx.dir), folder.parents[1],
                              {folder / rel for rel in case.rewrites})
    p = outcome.problems
    said = " ".join(outcome.errors if not case.control else shown)
    if case.control:
        if rc != 0 or outcome.errors:
            p.append(f"a control failed (exit {rc})")
    else:
        if rc == 0:
            p.append("exit 0")
        if len(outcome.errors) != 1:
            p.append(f"{len(outcome.errors)} `error:` lines")
        if outcome.others:
            p.append(f"{len(outcome.others)} other stderr lines")
        if "test acc" in outcome.stdout:
            p.append("an accuracy was printed")
        unknown = [flag for line in outcome.errors for flag in FLAG.findall(line)
                   if flag not in flags_of(case.script)]
        if unknown:
            p.append(f"names {', '.join(unknown)}, not a flag of {case.script}")
        if case.script == X and new_features(before, folder):
            p.append(f"wrote {', '.join(new_features(before, folder))}")
    p += [f"does not say {w!r}" for w in case.expect if w not in said]
    p += [f"says {w!r}" for w in case.avoid if w in said]
    if case.seconds is not None and seconds - startup > case.seconds:
        p.append(f"took {seconds:.1f} s, more than {case.seconds} s")
    if case.check and not p:
        try:
            p += case.check(outcome)
        except Exception as e:  # what the check reads is not there: the case did not do what it should
            p.append(f"its check failed: {type(e).__name__}: {e}")
    if outcome.lost:
        p.append("files lost")
    return outcome


@contextlib.contextmanager
def in_case_folder(folder):
    """The case's folder as the working folder and $HOME (whatever is written to ~ is checked), restored after."""
    cwd, home = os.getcwd(), os.environ.get("HOME")
    os.environ["HOME"] = str(folder)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        if home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = home


def entry_point(script):
    return {T: cli.train_command, X: cli.extract_command, P: classify.predict_command}[script]


def run_in_process(outcome, before, fx):
    """The case's command run in this process (cli's own entry point, as the script calls it), in the case's
    folder with HOME there, within its stand-ins, its output captured; then judged."""
    main, case = entry_point(outcome.case.script), outcome.case
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with in_case_folder(outcome.folder), case.within(outcome.folder) if case.within else contextlib.nullcontext():
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(outcome.argv)
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
    return judge(outcome, rc, out.getvalue(), err.getvalue(), before, fx, time.perf_counter() - start)


def main(argv=None):
    """python -m fewshot.testing.bad_inputs CASE ARGS...: the case's command (train.py's or extract_features.py's
    entry point with ARGS) run within the case's stand-ins, in the working folder, its case folder: how
    bench/bad_inputs.py runs a case that has stand-ins as a real process."""
    name, *args = sys.argv[1:] if argv is None else argv
    case = CASES[name]
    with case.within(Path.cwd()):
        entry_point(case.script)(args)


if __name__ == "__main__":
    main()
