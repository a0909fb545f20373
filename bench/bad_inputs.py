"""
Bad inputs: what every bad input gets (docs/bad-inputs.md), measured on the real commands.

Each case runs `python train.py ...` or `python extract_features.py ...` as a real subprocess (OMP_NUM_THREADS=1,
--device cpu --workers 0) on tiny fixtures built in a temporary folder (bench/fixtures.py's random CLIP, CoOp-layout
datasets and synthetic features), and checks what the project promises:

- bad input gets exactly ONE `error: ...` line on stderr, as a terminal shows it (tqdm redraws a line after
  "\\r" and clears it when closed, so only the text after the last "\\r" of each line counts), and a non-zero
  exit; never an accuracy with exit 0;
- nothing is lost: every file that existed before (a sentinel "previous results" at --out, the inputs, the
  shared fixtures) is unchanged, nothing half-written appears, no hidden .*.tmp is left.

Control rows (a 16-bit PNG, --epochs 0) are not bad inputs: they must succeed. Then three parallel runs:
two extractions of one file with different --views, two train.py jobs (--seeds 1, --seeds 2) extracting one
file on demand, and an extraction killed with kill -9 inside its write, then run again.

    python bench/bad_inputs.py                      # every case, then the parallel runs
    python bench/bad_inputs.py --cases lr-zero nan-test --no-parallel
    python bench/bad_inputs.py --keep               # keep the temporary folder to look at the files

Exits 1 when any case or parallel run does not behave as promised. Each process spends 2-3.5 s of CPU
importing torch (and, for an extraction or a --clip-checkpoint, open_clip) before it reads its first flag, so the
~50 processes take about 2.5 CPU-minutes: 1.5 minutes on two idle cores (--jobs 2), more on a busy machine.
"""

import argparse
import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import extract_features as ef  # noqa: E402  (after the path is set)
import fewshot_data as fd  # noqa: E402
import train  # noqa: E402
from features_file import Settings, load_features  # noqa: E402
from fixtures import TINY_NAMES, synthetic_features, tiny_clip, write_dataset  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models, busy machine: as in the tests
SENTINEL = b"previous results\n"             # what --out (and features/previous.pt) hold before each case
FEATURES = f"features/dtd_{TINY_NAMES['vit']}.pt"  # the file the extraction cases and parallel runs write
# every command gets these first; a case's own flags come after and win (argparse keeps the last value)
COMMON = "--device cpu --workers 0 --clip-checkpoint {clip} --features-dir features --seeds 1 " \
         "--max-shots 2 --views 2"


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
            return ef.extract_features(settings, self.data, self.dir / "features", workers=0, device="cpu")

    @functools.cached_property
    def ck(self):
        """A checkpoint folder: hegraph-t, 2 shots, seeds 1 and 2 (train.py --save)."""
        return self._save("hegraph-t", (1, 2), "ck_t")

    @functools.cached_property
    def ck_full(self):
        """Another run's checkpoint folder: hegraph, 2 shots, seed 2."""
        return self._save("hegraph", (2,), "ck_full")

    def _save(self, method, seeds, name):
        argv = ["--features", str(self.feats), "--method", method, "--shots", "2", "--epochs", "1",
                "--seeds", *map(str, seeds), "--save", str(self.dir / name)]
        with quiet():
            train.run(train.parse_args(argv))
        return self.dir / name


@contextlib.contextmanager
def quiet():
    """Silence an in-process run (its table, its progress bars) while building fixtures."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# -----------------------------------------------------------------------------
# how to break a case's own copy of the inputs: prepare(case_dir, fixtures)

def spoiled(change):
    """f.pt: a copy of the synthetic features with change(data) applied."""
    def prepare(case, fx):
        data = torch.load(fx.feats, weights_only=True)
        change(data)
        torch.save(data, case / "f.pt")
    return prepare


def rows(split, value):
    """Rows 1, 4, 6 of a split's features set to value (NaN or 0)."""
    def change(data):
        data[split]["features"][[1, 4, 6]] = value
    return change


def cut(source, name, keep):
    """name: the first `keep` bytes of the fixture `source` (keep=0: an empty file)."""
    def prepare(case, fx):
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(Path(fx[source]).read_bytes()[:keep])
    return prepare


def checkpoints(then=None):
    """ck/: a copy of the hegraph-t checkpoint folder, then then(ck, fixtures)."""
    def prepare(case, fx):
        shutil.copytree(fx.ck, case / "ck")
        if then:
            then(case / "ck", fx)
    return prepare


def dataset(counts=None, then=None):
    """data/: a fresh dtd dataset of the case's own, then then(images folder, split file)."""
    def prepare(case, fx):
        write_dataset(case / "data", "dtd", counts=counts)
        spec = fd.DATASETS["dtd"]
        if then:
            then(case / "data" / spec.folder / spec.images, case / "data" / spec.folder / spec.split)
    return prepare


def fractional_label(images, split_file):
    """A training label of 1.7 in the split json (int() would have made it class 1)."""
    split = json.loads(split_file.read_text())
    split["train"][3][1] = 1.7
    split_file.write_text(json.dumps(split))


def unreadable_images(images, split_file):
    """Three bad test images (the test split is always encoded whole): one missing, one text, one empty."""
    (images / "class a_0" / "test_1.jpg").unlink()
    (images / "class b_1" / "test_2.jpg").write_text("not a jpeg")
    (images / "class c_2" / "test_0.jpg").write_bytes(b"")


def sixteen_bit_png(images, split_file):
    """A 16-bit grey PNG in the test split, and its 8-bit twin (same picture): both must encode alike."""
    gray = np.random.default_rng(0).integers(0, 256, (36, 48), dtype=np.uint8)
    Image.fromarray(gray).save(images / "class a_0" / "test_8bit.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "class a_0" / "test_16bit.png")
    assert Image.open(images / "class a_0" / "test_16bit.png").mode == "I;16"
    split = json.loads(split_file.read_text())
    split["test"] += [[f"class a_0/test_{b}.png", 0, "class a_0"] for b in ("8bit", "16bit")]
    split_file.write_text(json.dumps(split))


def same_16_and_8_bit_features(case):
    """check of the 16-bit control: the features file is complete and the 16-bit image equals its 8-bit twin."""
    data = load_features(case / FEATURES)
    paths = data["paths"]["test"]
    eight, sixteen = (data["test"]["features"][paths.index(f"class a_0/test_{b}.png")] for b in ("8bit", "16bit"))
    return [] if torch.equal(eight, sixteen) else ["the 16-bit PNG's features differ from its 8-bit twin's"]


def truncate(path, keep):
    """Keep the first `keep` bytes of a file."""
    path.write_bytes(path.read_bytes()[:keep])


def mixed_seeds(ck, fx):
    """seed2.pt of another run (hegraph) beside seed1.pt of hegraph-t."""
    shutil.copy(fx.ck_full / "seed2.pt", ck / "seed2.pt")


def older_config(ck, fx):
    """seed1.pt as an older train.py wrote it: its model configuration has no weight_scale."""
    ckpt = torch.load(ck / "seed1.pt", weights_only=True)
    del ckpt["model_config"]["weight_scale"]
    torch.save(ckpt, ck / "seed1.pt")


def a_file(name):
    """A plain file where a folder is needed: --out name/r.json and --save name/ck cannot be written."""
    def prepare(case, fx):
        (case / name).write_text("a file, not a folder\n")
    return prepare


def copied_features(case, fx):
    """FEATURES: dtd's features made with seeds 1, max-shots 2, views 2."""
    shutil.copy(fx.dtd_features, case / FEATURES)


def features_before_open_clip(case, fx):
    """FEATURES as extract_features.py wrote it with OpenAI's clip package: its settings name no weights."""
    data = torch.load(fx.dtd_features, weights_only=True)
    del data["settings"]["pretrained"]
    torch.save(data, case / FEATURES)


def checkpoint_changed(change):
    """ck/ with change(seed1.pt's checkpoint dict) applied."""
    def then(ck, fx):
        ckpt = torch.load(ck / "seed1.pt", weights_only=True)
        change(ckpt)
        torch.save(ckpt, ck / "seed1.pt")
    return checkpoints(then)


def split_changed(change):
    """data/: a dtd dataset whose split file has change(split) applied."""
    def then(images, split_file):
        split = json.loads(split_file.read_text())
        change(split)
        split_file.write_text(json.dumps(split))
    return dataset(then=then)


def feats_copy(case, fx):
    """f.pt: a copy of the synthetic features (an input the case's output may not overwrite)."""
    shutil.copy(fx.feats, case / "f.pt")


def a_folder(case, fx):
    (case / "folder").mkdir()


def a_pipe(case, fx):
    os.mkfifo(case / "pipe")


def other_classes(case, fx):
    """f.pt: the synthetic features with other class names (the checkpoints in ck/ are of the original)."""
    spoiled(lambda d: d.__setitem__("classnames", [f"other {c}" for c in d["classnames"]]))(case, fx)
    checkpoints()(case, fx)


def results_json(case):
    """check of the train.py control: --out=~/control.json went to $HOME (the case's folder), complete."""
    if (case / "~").exists():
        return ["a folder named ~ was made"]
    r = json.loads((case / "control.json").read_text())
    return [] if r["test_accuracy"] >= 0 and r["recipe"]["epochs"] == 0 else ["control.json is not the run's"]


# -----------------------------------------------------------------------------
# the cases: name -> (script, bad input, arguments, how to break the fixture)

@dataclass
class Case:
    script: str                       # "train" or "extract"
    bad: str                          # the bad input, in words
    args: str                         # after COMMON; {name} is a shared fixture, other paths are the case's own
    prepare: Callable | None = None   # (case folder, fixtures): make the case's broken inputs
    control: bool = False             # not a bad input: must succeed
    check: Callable | None = None     # control: (case folder) -> problems


T, X = "train", "extract"
CASES = {
    # train.py on a features file: load_features checks every tensor it will use
    "nan-test": Case(T, "NaN rows in the test features", "--features f.pt --method zeroshot --shots 2",
                     spoiled(rows("test", float("nan")))),
    "zero-test": Case(T, "all-zero rows in the test features", "--features f.pt --method zeroshot --shots 2",
                      spoiled(rows("test", 0.0))),
    "nan-val": Case(T, "NaN rows in the val features", "--features f.pt --method tip --search-val --shots 2",
                    spoiled(rows("val", float("nan")))),
    "no-text-positive": Case(T, "no `text.positive` in the features file", "--features f.pt --shots 2",
                             spoiled(lambda d: d["text"].pop("positive"))),
    "no-train-labels": Case(T, "no `train.labels` in the features file", "--features f.pt --shots 2",
                            spoiled(lambda d: d["train"].pop("labels"))),
    "fewshot-out-of-range": Case(T, "a few-shot index out of range", "--features f.pt --shots 2",
                                 spoiled(lambda d: d["fewshot"][1].__setitem__((0, 0), 10**6))),
    "no-negatives": Case(T, "no negative text features, method hegraph", "--features f.pt --shots 2 --epochs 1",
                         spoiled(lambda d: d["text"].pop("negative"))),
    "features-truncated": Case(T, "a truncated features `.pt`", "--features f.pt", cut("feats", "f.pt", 200)),
    "features-empty": Case(T, "an empty features `.pt`", "--features f.pt", cut("feats", "f.pt", 0)),
    "other-dataset": Case(T, "`--features` of another dataset than `--dataset`", "--features {feats} --dataset dtd"),
    # recipe and protocol flags
    "epochs-negative": Case(T, "`--epochs -1`", "--features {feats} --epochs -1"),
    "lr-zero": Case(T, "`--lr 0`", "--features {feats} --lr 0"),
    "batch-size-zero": Case(T, "`--batch-size 0`", "--features {feats} --batch-size 0"),
    "lr-diverges": Case(T, "`--lr 1e6`: the loss diverges", "--features {feats} --shots 4 --lr 1e6 --epochs 30 "
                                                            "--seeds 2"),
    "shots-zero": Case(T, "`--shots 0`", "--features {feats} --shots 0"),
    "shots-above-file": Case(T, "`--shots 8`, above the features file's max-shots 4", "--features {feats} --shots 8"),
    "shots-above-max-shots": Case(T, "`--shots 32` above `--max-shots 2`, extracting on demand",
                                  "--dataset dtd --root {data} --shots 32"),
    "search-val-zeroshot": Case(T, "`--method zeroshot --search-val`",
                                "--features {feats} --method zeroshot --search-val --shots 2"),
    "unknown-dataset-train": Case(T, "an unknown `--dataset`", "--dataset fgvc"),
    "device-cuda-train": Case(T, "`--device cuda` on a machine without CUDA", "--features {feats} --device cuda"),
    "few-images": Case(T, "a class with fewer training images than `--max-shots`, extracting on demand",
                       "--dataset dtd --root data --max-shots 4 --shots 2", dataset(counts={"train": [5, 2, 6]})),
    "absent-root-other-settings": Case(T, "absent `--root`, an existing features file made with `--views 2`",
                                       "--dataset dtd --root absent --views 3 --shots 2", copied_features),
    # checkpoints and outputs
    "eval-only-method": Case(T, "`--eval-only` with a conflicting `--method`",
                             "--features {feats} --eval-only --load {ck} --method tip --seeds 1 2"),
    "eval-only-shots": Case(T, "`--eval-only` with a conflicting `--shots`",
                            "--features {feats} --eval-only --load {ck} --shots 4 --seeds 1"),
    "eval-only-mixed": Case(T, "`--eval-only` on a folder whose seeds disagree",
                            "--features {feats} --eval-only --load ck --seeds 1 2", checkpoints(mixed_seeds)),
    "checkpoint-truncated": Case(T, "a truncated checkpoint `.pt`", "--features {feats} --eval-only --load ck "
                                 "--seeds 1", checkpoints(lambda ck, fx: truncate(ck / "seed1.pt", 200))),
    "checkpoint-empty": Case(T, "an empty checkpoint `.pt`", "--features {feats} --eval-only --load ck --seeds 1",
                             checkpoints(lambda ck, fx: truncate(ck / "seed1.pt", 0))),
    "checkpoint-older-config": Case(T, "a checkpoint whose config lacks a field added since (weight_scale)",
                                    "--features {feats} --eval-only --load ck --seeds 1", checkpoints(older_config)),
    "out-unwritable": Case(T, "an unwritable `--out` (its folder is a file)",
                           "--features {feats} --shots 2 --epochs 1 --out file/r.json", a_file("file")),
    "save-unwritable": Case(T, "an unwritable `--save` (its parent is a file)",
                            "--features {feats} --shots 2 --epochs 1 --save file/ck", a_file("file")),
    "save-mixed": Case(T, "`--save` into a folder holding another method's checkpoints",
                       "--features {feats} --method hegraph --shots 2 --epochs 1 --save ck", checkpoints()),
    # extract_features.py
    "fractional-label": Case(X, "a fractional label (1.7) in a split file", "--dataset dtd --root data",
                             dataset(then=fractional_label)),
    "empty-class": Case(X, "a class with no training images", "--dataset dtd --root data",
                        dataset(counts={"train": [5, 0, 6]})),
    "unreadable-images": Case(X, "3 unreadable images (missing, text, empty)", "--dataset dtd --root data",
                              dataset(then=unreadable_images)),
    "missing-root": Case(X, "no dataset folder and no features file", "--dataset dtd --root absent"),
    "unknown-dataset-extract": Case(X, "an unknown `--dataset`", "--dataset fgvc --root {data}"),
    "device-cuda-extract": Case(X, "`--device cuda` on a machine without CUDA", "--dataset dtd --root {data} "
                                "--device cuda"),
    "clip-checkpoint-text": Case(X, "a text file as `--clip-checkpoint`", "--dataset dtd --root {data} "
                                 "--clip-checkpoint clip.txt", lambda case, fx: (case / "clip.txt").write_text(
                                     "model: ViT-B/32\n")),
    "backbone-not-the-checkpoints": Case(X, "`--backbone RN50` with a ViT `--clip-checkpoint`",
                                         "--dataset dtd --root {data} --backbone RN50"),
    "pretrained-with-checkpoint": Case(X, "`--pretrained openai` with a `--clip-checkpoint`",
                                       "--dataset dtd --root {data} --pretrained openai"),
    "features-before-open-clip": Case(T, "a features file extracted with OpenAI's clip package, before open_clip",
                                      "--dataset dtd --root {data} --shots 2", features_before_open_clip),
    "features-at-output-empty": Case(X, "an empty file at the features file's path", "--dataset dtd --root {data}",
                                     cut("feats", FEATURES, 0)),
    "other-settings": Case(X, "an existing features file made with other settings (`--views 2`)",
                           "--dataset dtd --root {data} --views 3", copied_features),
    "encode-batch-size-zero": Case(X, "`--encode-batch-size 0`", "--dataset dtd --root {data} "
                                   "--encode-batch-size 0"),
    "workers-negative": Case(X, "`--workers -1`", "--dataset dtd --root {data} --workers -1"),
    "negative-template": Case(X, "`--negative-template` without `{}`", "--dataset dtd --root {data} "
                              "--negative-template 'a photo of nothing.'"),
    # issue 17: outputs that are inputs, devices, files, or folders where files go
    "out-is-the-features": Case(T, "`--out` the `--features` file itself", "--features f.pt --out f.pt --shots 2 "
                                "--epochs 1", feats_copy),
    "out-is-a-folder": Case(T, "`--out` an existing folder", "--features {feats} --out folder --shots 2", a_folder),
    "out-is-a-pipe": Case(T, "`--out` a named pipe (a device-like node)", "--features {feats} --out pipe --shots 2",
                          a_pipe),
    "out-in-the-dataset": Case(T, "`--out` inside the dataset folder", "--dataset dtd --root {data} --shots 2 "
                               "--out {data}/dtd/results.json"),
    "out-name-too-long": Case(T, "`--out` whose name is too long for the file system", "--features {feats} --shots 2 "
                              "--out " + "r" * 250 + ".json"),
    "save-is-a-file": Case(T, "`--save` an existing file", "--features {feats} --shots 2 --save file", a_file("file")),
    # issue 17: every number that enters a formula, checked where it enters
    "alpha-nan": Case(T, "`--alpha nan`", "--features {feats} --alpha nan"),
    "beta-inf": Case(T, "`--beta-vp inf`", "--features {feats} --beta-vp inf"),
    "gamma-zero": Case(T, "`--gamma 0`", "--features {feats} --method tip --gamma 0"),
    "ratio-above-1": Case(T, "`--ratio 1.5` for clip-adapter", "--features {feats} --method clip-adapter --ratio 1.5"),
    "setting-of-another-method": Case(T, "`--ratio 0.5` for hegraph (CLIP-Adapter's setting)",
                                      "--features {feats} --ratio 0.5"),
    "seed-huge": Case(T, "`--seeds 18446744073709551616` (2^64)", "--features {feats} --seeds 18446744073709551616"),
    "shots-fractional": Case(T, "`--shots 2.5`", "--features {feats} --shots 2.5"),
    "logit-scale-zero": Case(T, "a features file whose `logit_scale` is 0", "--features f.pt --shots 2",
                             spoiled(lambda d: d.__setitem__("logit_scale", 0.0))),
    "logit-scale-nan": Case(T, "a features file whose `logit_scale` is NaN", "--features f.pt --shots 2",
                            spoiled(lambda d: d.__setitem__("logit_scale", float("nan")))),
    "logit-scale-text": Case(T, "a features file whose `logit_scale` is the string \"100\"", "--features f.pt "
                             "--shots 2", spoiled(lambda d: d.__setitem__("logit_scale", "100"))),
    "test-split-empty": Case(T, "a features file with an empty test split", "--features f.pt --shots 2",
                             spoiled(lambda d: d.__setitem__("test", {k: v[:0] for k, v in d["test"].items()}))),
    "zero-views": Case(T, "a features file with zero training views", "--features f.pt --shots 2",
                       spoiled(lambda d: d["train"].__setitem__("features", d["train"]["features"][:0]))),
    "fewshot-bool": Case(T, "few-shot indices of type bool (a mask, not indices)", "--features f.pt --shots 2",
                         spoiled(lambda d: d["fewshot"].__setitem__(1, d["fewshot"][1].bool()))),
    "checkpoint-nan": Case(T, "NaN weights in a checkpoint", "--features {feats} --eval-only --load ck --seeds 1",
                           checkpoint_changed(lambda c: c["state_dict"]["b_p"].fill_(float("nan")))),
    "checkpoint-wrong-shape": Case(T, "a checkpoint tensor of the wrong shape", "--features {feats} --eval-only "
                                   "--load ck --seeds 1", checkpoint_changed(
                                       lambda c: c["state_dict"].__setitem__("b_p", c["state_dict"]["b_p"][:, :4]))),
    "checkpoint-extra-tensor": Case(T, "a checkpoint with a tensor the model does not have", "--features {feats} "
                                    "--eval-only --load ck --seeds 1", checkpoint_changed(
                                        lambda c: c["state_dict"].__setitem__("extra", torch.zeros(2)))),
    "checkpoint-other-classes": Case(T, "checkpoints of another dataset with the same shapes", "--features f.pt "
                                     "--eval-only --load ck --seeds 1", other_classes),
    "device-meta": Case(T, "`--device meta`", "--features {feats} --device meta"),
    "device-mps": Case(T, "`--device mps` on a machine without MPS", "--features {feats} --device mps"),
    "device-xpu": Case(X, "`--device xpu`", "--dataset dtd --root {data} --device xpu"),
    "split-image-twice": Case(X, "a split file listing a training image in the test split too",
                              "--dataset dtd --root data", split_changed(lambda s: s["test"].append(s["train"][0]))),
    "split-two-names": Case(X, "a split file giving one label two class names", "--dataset dtd --root data",
                            split_changed(lambda s: s["train"].append([s["train"][5][0], 0, "another name"]))),
    "split-path-not-a-name": Case(X, "a split file whose image path is a number", "--dataset dtd --root data",
                                  split_changed(lambda s: s["train"].append([7, 0, "class a_0"]))),
    # controls: not bad inputs
    "16-bit-png": Case(X, "control: a 16-bit PNG (and its 8-bit twin) in the test split", "--dataset dtd --root data",
                       dataset(then=sixteen_bit_png), control=True, check=same_16_and_8_bit_features),
    "epochs-zero": Case(T, "control: `--epochs 0` evaluates the starting point; `~` in `--out=~/control.json`",
                        "--features {feats} --shots 2 --epochs 0 --out=~/control.json", control=True,
                        check=results_json),
}


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
    """The flags a script's --help lists (read in-process): an error must only name those (no dead ends)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        train.parse_args(["--help"]) if script == T else ef.main(["--help"])
    return set(FLAG.findall(out.getvalue()))


def snapshot(*folders):
    """{path: sha256} of every file under the folders."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


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


def files_lost(before, after, root):
    """Pre-existing files changed or deleted, hidden .tmp left, new files that are half-written or stray."""
    name = lambda p: str(p.relative_to(root))
    lost = [f"changed {name(p)}" if p in after else f"deleted {name(p)}"
            for p, digest in before.items() if after.get(p) != digest]
    for p in after.keys() - before.keys():
        if p.name.endswith(".tmp"):
            lost.append(f"left {name(p)}")
        elif p.name.startswith(".") and p.name.endswith(".lock") and p.stat().st_size == 0:
            continue                                            # file_lock's empty lock file: documented
        elif p.suffix not in (".pt", ".json") or not complete(p):
            lost.append(f"half-written or stray {name(p)}")
    return sorted(lost)


def command(script, args, fx):
    """The full argument list of a case's command: python SCRIPT COMMON [--out results.json] ARGS."""
    out = " --out results.json" if script == T else ""
    text = f"{COMMON}{out} {args}".format_map(fx)
    return [sys.executable, str(ROOT / f"{'train' if script == T else 'extract_features'}.py"), *shlex.split(text)]


@dataclass
class Outcome:
    """What one case did, and whether that is what the project promises."""
    name: str
    case: Case
    argv: list
    folder: Path
    rc: int = None
    errors: list = field(default_factory=list)    # shown stderr lines that start with "error:"
    others: list = field(default_factory=list)    # the other shown stderr lines
    lost: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # why it is not as promised (empty: it is)
    stdout: str = ""
    stderr: str = ""


def prepare(name, case, folder, fx):
    """Make the case's folder, its broken inputs and its sentinels; returns its Outcome, to be run."""
    folder.mkdir(parents=True)
    (folder / "features").mkdir()
    (folder / "results.json").write_bytes(SENTINEL)               # train.py's --out, unless the case says other
    (folder / "features" / "previous.pt").write_bytes(SENTINEL)   # another file in the extraction's folder
    if case.prepare:
        case.prepare(folder, fx)
    return Outcome(name, case, command(case.script, case.args, fx), folder)


def run_case(outcome, before, fx):
    """Run the case's command in its folder, then judge exit, stderr, stdout and files."""
    folder = outcome.folder
    env = {**ENV, "HOME": str(folder)}       # ~ is the case's folder: whatever is written there is checked
    proc = subprocess.run(outcome.argv, cwd=folder, env=env, capture_output=True, timeout=300)
    outcome.rc, outcome.stdout, outcome.stderr = proc.returncode, decode(proc.stdout), decode(proc.stderr)
    shown = shown_lines(outcome.stderr)
    outcome.errors = [line for line in shown if line.startswith("error:")]
    outcome.others = [line for line in shown if not line.startswith("error:")]
    outcome.lost = files_lost(before, snapshot(folder, fx.dir), folder.parents[1])
    p = outcome.problems
    if outcome.case.control:
        if proc.returncode != 0 or outcome.errors:
            p.append(f"a control failed (exit {proc.returncode})")
        else:
            p += outcome.case.check(folder)
    else:
        if proc.returncode == 0:
            p.append("exit 0")
        if len(outcome.errors) != 1:
            p.append(f"{len(outcome.errors)} `error:` lines")
        if outcome.others:
            p.append(f"{len(outcome.others)} other stderr lines")
        if "test acc" in outcome.stdout:
            p.append("an accuracy was printed")
        unknown = [flag for line in outcome.errors for flag in FLAG.findall(line)
                   if flag not in flags_of(outcome.case.script)]
        if unknown:
            p.append(f"names {', '.join(unknown)}, not a flag of {outcome.case.script}")
    if outcome.lost:
        p.append("files lost")
    return outcome


def run_cases(names, tmp, jobs=2):
    """Prepare every case (one at a time: fixtures are built on first use), take the checksums of every file,
    then run the cases, `jobs` at once."""
    fx = Fixtures(tmp / "shared")
    outcomes = [prepare(name, CASES[name], tmp / "cases" / name, fx) for name in names]
    befores = [snapshot(o.folder, fx.dir) for o in outcomes]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda o, before: run_case(o, before, fx), outcomes, befores)), fx


# -----------------------------------------------------------------------------
# parallel runs

@dataclass
class Parallel:
    """One parallel scenario: what each process did, and whether the features file survived."""
    name: str
    processes: list = field(default_factory=list)   # (label, rc, error lines, stdout)
    problems: list = field(default_factory=list)

    @property
    def survived(self):
        return not self.problems


def start(argv, cwd):
    return subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_all(procs, timeout=300):
    """communicate() with every process at once (a full pipe must not stall one while another is read);
    [(stdout, stderr)] as text."""
    with ThreadPoolExecutor(len(procs)) as pool:
        return [(decode(out), decode(err)) for out, err in pool.map(lambda p: p.communicate(timeout=timeout), procs)]


def judge_processes(scenario, labels, procs, outputs, path):
    """Every process succeeded or printed exactly one error line; the file that remains is complete and was
    written by exactly one of them. Returns the writers' labels."""
    writers = []
    for label, proc, (out, err) in zip(labels, procs, outputs):
        errors = [line for line in shown_lines(err) if line.startswith("error:")]
        scenario.processes.append((label, proc.returncode, errors, out))
        if proc.returncode != 0 and (len(errors) != 1 or len(shown_lines(err)) != 1):
            scenario.problems.append(f"{label}: exit {proc.returncode} with {len(shown_lines(err))} stderr lines")
        if proc.returncode == 0 and errors:
            scenario.problems.append(f"{label}: exit 0 with an error line")
        if f"wrote {FEATURES}" in out:                 # the path as the command gave it
            writers.append(label)
    if len(writers) != 1:
        scenario.problems.append(f"written by {len(writers)} processes ({writers})")
    try:
        load_features(path)
    except Exception as e:
        scenario.problems.append(f"the features file is not complete: {e}")
    leftovers = [p.name for p in path.parent.glob(".*.tmp")]
    if leftovers:
        scenario.problems.append(f"left {leftovers}")
    return writers


def check_writer(s, path, writers, setting, shown):
    """The features file that remains holds the `setting` its one writer asked for (writers[0], "NAME VALUE")."""
    if writers and path.exists():
        value = torch.load(path, weights_only=True)["settings"][setting]
        if f"{setting} {shown(value)}" != writers[0]:
            s.problems.append(f"the file has {setting} {value}, its writer asked for {writers[0]}")


def two_extractions(folder, fx):
    """extract_features.py --views 2 and --views 3 on one dataset and file, started together."""
    s = Parallel("2 x extract_features.py, `--views 2` and `--views 3`, one file")
    folder.mkdir(parents=True)
    argvs = [command(X, f"--dataset dtd --root {{data}} --views {v}", fx) for v in (2, 3)]
    procs = [start(argv, folder) for argv in argvs]
    path = folder / FEATURES
    writers = judge_processes(s, ["views 2", "views 3"], procs, finish_all(procs), path)
    check_writer(s, path, writers, "views", str)
    return s


def two_seed_jobs(folder, fx):
    """train.py --seeds 1 and --seeds 2, each extracting the same features file on demand, started together."""
    s = Parallel("2 x train.py, `--seeds 1` and `--seeds 2`, extracting one file")
    folder.mkdir(parents=True)
    argvs = [command(T, f"--dataset dtd --root {{data}} --shots 2 --epochs 2 --seeds {seed} --out r{seed}.json", fx)
             for seed in (1, 2)]
    procs = [start(argv, folder) for argv in argvs]
    path = folder / FEATURES
    writers = judge_processes(s, ["seeds 1", "seeds 2"], procs, finish_all(procs), path)
    check_writer(s, path, writers, "seeds", lambda seeds: " ".join(map(str, seeds)))
    for seed, proc in zip((1, 2), procs):
        if proc.returncode == 0 and "test_accuracy" not in json.loads((folder / f"r{seed}.json").read_text()):
            s.problems.append(f"seeds {seed}: exit 0 without results")
    return s


def pipe_bytes(fd):
    """Bytes waiting in a pipe."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def blocked_writing(proc, reader):
    """True once the process has written into the pipe and sleeps in a pipe write (Linux: /proc/PID/wchan)."""
    wchan = Path(f"/proc/{proc.pid}/wchan")
    return pipe_bytes(reader) > 0 and "pipe_write" in (wchan.read_text() if wchan.exists() else "")


def killed_write(folder, fx):
    """kill -9 of an extraction inside its write, then the same command again.

    To kill it inside the write, not before or after, the temporary file the process will write
    (.dtd_NAME.pt.HOST.PID.tmp, write_atomic's naming) is made beforehand as a FIFO whose pipe holds one page:
    the process opens it, writes a few kB and sleeps in the middle of torch.save. It is killed there. The FIFO
    is then replaced by a plain file holding the bytes it wrote, which is what a killed write to a disk leaves.
    """
    s = Parallel("extract_features.py killed (`kill -9`) inside its write, then run again")
    folder.mkdir(parents=True)
    (folder / "features").mkdir()
    argv = command(X, "--dataset dtd --root {data}", fx)
    proc = start(argv, folder)
    tmp = folder / "features" / f".{Path(FEATURES).name}.{socket.gethostname()}.{proc.pid}.tmp"
    os.mkfifo(tmp)
    reader = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
    deadline = time.time() + 240
    while proc.poll() is None and not blocked_writing(proc, reader) and time.time() < deadline:
        time.sleep(0.02)
    if not blocked_writing(proc, reader):
        proc.kill()
        err = decode(proc.communicate()[1])
        os.close(reader)
        s.problems.append(f"the extraction never blocked in its write (exit {proc.returncode}): {err[-300:]}")
        return s
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    written = os.read(reader, 1 << 16)
    os.close(reader)
    tmp.unlink()
    tmp.write_bytes(written)            # what a killed write to a regular file leaves
    s.processes.append(("killed", proc.returncode, [], f"killed after writing {len(written)} bytes"))
    if (folder / FEATURES).exists():
        s.problems.append("a features file exists after the killed write")
    again = start(argv, folder)
    judge_processes(s, ["rerun"], [again], finish_all([again]), folder / FEATURES)
    if again.returncode != 0:
        s.problems.append("the rerun failed")
    return s


PARALLEL = {"two-extractions": two_extractions, "two-seed-jobs": two_seed_jobs, "killed-write": killed_write}


def run_parallel(tmp, fx):
    """The parallel scenarios, one after the other (each is two processes at once)."""
    return [scenario(tmp / "parallel" / name, fx) for name, scenario in PARALLEL.items()]


# -----------------------------------------------------------------------------
# the table

def cell(text, width=110):
    """A markdown table cell: one line, no pipes, at most `width` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def display(case):
    """The case's command as a reader should see it: the script and the case's own flags ($fixture for shared
    files; other paths are the case's own folder, the command's working directory)."""
    script = "train.py" if case.script == T else "extract_features.py"
    return f"`{script} {case.args.replace('{', '$').replace('}', '')}`"


def table(outcomes):
    """The markdown table of the cases."""
    lines = ["| # | command | bad input | exit | `error:` lines | other stderr lines | files lost | as promised |",
             "|---:|---|---|---:|---|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        errors = f"{len(o.errors)}" + (f": {cell(o.errors[0])}" if o.errors else "")
        others = f"{len(o.others)}" + (f": {cell(o.others[0], 60)}" if o.others else "")
        lost = f"{len(o.lost)}" + (f": {cell('; '.join(o.lost), 80)}" if o.lost else "")
        verdict = "yes" if not o.problems else f"**NO**: {cell('; '.join(o.problems), 80)}"
        lines.append(f"| {i} | {display(o.case)} | {cell(o.case.bad)} | {o.rc} | {errors} | {others} | {lost} | "
                     f"{verdict} |")
    return "\n".join(lines)


def what_it_did(label, rc, errors, out):
    """One process of a parallel run, in words: its exit, whether it waited for the lock, what it did."""
    text = f"{label}: exit {rc}" + (", waited" if "waiting for another process" in out else "")
    if errors:
        return f"{text}, {cell(errors[0], 90)}"
    if "wrote " in out:
        return f"{text}, wrote the file"
    return f"{text}, {out}" if label == "killed" else text


def parallel_table(scenarios):
    """The markdown table of the parallel runs."""
    lines = ["| parallel run | processes | survived |", "|---|---|---|"]
    for s in scenarios:
        verdict = "yes" if s.survived else f"**NO**: {cell('; '.join(s.problems), 100)}"
        lines.append(f"| {s.name} | {'; '.join(what_it_did(*p) for p in s.processes)} | {verdict} |")
    return "\n".join(lines)


def summary(outcomes, scenarios):
    """The closing line: bad inputs tried, those with exactly one error line, files lost, parallel runs survived."""
    bad = [o for o in outcomes if not o.case.control]
    controls = [o for o in outcomes if o.case.control]
    one_line = sum(len(o.errors) == 1 and not o.others and o.rc != 0 for o in bad)
    lost = sum(len(o.lost) for o in outcomes)
    survived = sum(s.survived for s in scenarios)
    return (f"bad inputs tried {len(bad)}, exactly one error line {one_line}, files lost {lost}, parallel runs "
            f"survived {survived}/{len(scenarios)} (controls passed {sum(not o.problems for o in controls)}/"
            f"{len(controls)})")


def failures(outcomes):
    """The exact command and output of every case that did not behave as promised."""
    text = []
    for o in outcomes:
        if o.problems:
            text.append(f"\n{o.name}: {'; '.join(o.problems)}\n  cd {o.folder} && {shlex.join(o.argv)}  (--keep keeps "
                        f"the folder)\n"
                        f"  exit {o.rc}; stderr as shown:\n" + "".join(f"    {line}\n" for line in
                                                                     shown_lines(o.stderr)[:25]))
    return "".join(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                   help="run only these cases (default: all): " + ", ".join(CASES))
    p.add_argument("--no-parallel", action="store_true", help="skip the parallel runs")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = p.parse_args(argv)
    start_time = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    try:
        outcomes, fx = run_cases(args.cases, tmp, args.jobs)
        scenarios = [] if args.no_parallel else run_parallel(tmp, fx)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"Every command also gets `{COMMON.format(clip='$clip')}` (and train.py `--out results.json`, a "
          f"sentinel \"previous results\" file) first; its own flags follow. It runs in the case's own folder; "
          f"$feats, $data, $clip, $ck are shared fixtures.\n")
    print(table(outcomes))
    if scenarios:
        print()
        print(parallel_table(scenarios))
    print()
    print(summary(outcomes, scenarios))
    print(f"wall time {time.perf_counter() - start_time:.0f} s")
    broken = failures(outcomes)
    if broken:
        print("\nNot as promised:" + broken)
    return 1 if broken or not all(s.survived for s in scenarios) else 0


if __name__ == "__main__":
    sys.exit(main())
