"""The registry of bad inputs: every case once, with what the project promises for it, run by the tests (in
this process) and by bench/bad_inputs.py (as real commands, for the table in docs/bad-inputs.md).

A case is a command line of train.py, extract_features.py or predict.py and a way to break a copy of the shared
fixtures (a random CLIP, a CoOp-layout dataset, a synthetic features file, model files); cases come in families,
one per kind of input. What a bad input must get:

- exactly ONE `error: ...` line on stderr, as a terminal shows it (tqdm redraws a line after "\\r" and clears it
  when closed, so only the text after the last "\\r" of each line counts), naming only flags the command has,
  and a non-zero exit; never an accuracy with exit 0;
- nothing lost: every file that existed before (a sentinel "previous results" at --out, the inputs, the shared
  fixtures) is unchanged, nothing half-written appears, no hidden .*.tmp is left.

Controls (a 16-bit PNG, --epochs 0, a stale features file) are not bad inputs: they must succeed, and their check
must pass. A stale features file (an image changed under its name, a checkpoint replaced at its path, a folder of
the same name elsewhere) is such a control: it must not be reused, and the file rewritten (its `rewrites`) must
equal a fresh extraction.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fewshot.datasets as fd
from fewshot import classify, cli, runs
from fewshot.extraction import extract_features
from fewshot.features import Settings, load_features
from fewshot.testing.fixtures import (
    TINY_CLIPS,
    TINY_NAMES,
    openai_state_dict,
    redraw_image,
    synthetic_features,
    tiny_clip,
    write_dataset,
    write_image,
    write_image_folder,
)

SENTINEL = b"previous results\n"             # what --out (and features/previous.pt) hold before each case
FEATURES = f"features/dtd_{TINY_NAMES['vit']}.pt"  # the file the extraction cases and parallel runs write
# every command gets these first; a case's own flags come after and win (argparse keeps the last value)
COMMON = "--device cpu --workers 0 --clip-checkpoint {clip} --features-dir features --seeds 1 " \
         "--max-shots 2 --views 2"
PREDICT_COMMON = "--device cpu"  # predict.py's: it has none of the extraction's flags


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


def same_accuracy_without_negatives(case):
    """check of the control: the model (trained with negatives, which it carries) evaluates as it did."""
    return [] if json.loads((case / "r.json").read_text())["seeds"] else ["no accuracy recorded"]


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


def predictions_json(case):
    """check of the predict control: the photo's 2 most probable classes in p.json."""
    rows = json.loads((case / "p.json").read_text())["predictions"]
    return [] if len(rows) == 1 and len(rows[0]["top"]) == 2 else [f"p.json has {len(rows)} predictions"]


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


# the stale features files: made in the case's folder, then made stale; the rerun must redo exactly that work

def extracted(dataset="dtd", root="data", clip="clip.pt"):
    """features/: the case's own features of `dataset` (under the case's `root`, or a folder of its own), made with
    COMMON's settings and its own copy of the random CLIP (clip.pt); before.pt: a copy of that file."""
    def make(case, fx):
        if not (case / clip).exists():
            shutil.copy(fx.clip, case / clip)
        if dataset == "dtd" and not (case / root).exists():
            write_dataset(case / root, "dtd")
        with quiet():
            settings = Settings(dataset if dataset == "dtd" else str(case / dataset), clip_checkpoint=str(case / clip),
                                seeds=(1,), max_shots=2, views=2)
            path = extract_features(settings, case / root, case / "features", workers=0, device="cpu")
        shutil.copy(path, case / "before.pt")
    return make


def other_weights(path):
    """A random CLIP of the fixtures' architecture with other weights (its projections negated) at `path`."""
    state = openai_state_dict(TINY_CLIPS["vit"])
    for key in ("visual.proj", "text_projection"):
        state[key] = -state[key]
    torch.save(state, path)


def changed_image(case, fx):
    """features/ made from data/, then a test image of it drawn anew, its byte size and modification time kept."""
    extracted()(case, fx)
    redraw_image(case / "data" / "dtd" / "images" / "class a_0" / "test_0.jpg", 4242)


def replaced_checkpoint(case, fx):
    """features/ made with clip.pt, then clip.pt replaced by other weights."""
    extracted()(case, fx)
    other_weights(case / "clip.pt")


def folder_elsewhere(case, fx):
    """features/ of the folder a/mine; b/mine, a folder of the same name, holds one other picture."""
    write_image_folder(case / "a" / "mine", {"red_panda": 8, "snow-leopard": 8})
    extracted("a/mine", root=".")(case, fx)
    shutil.copytree(case / "a" / "mine", case / "b" / "mine")
    write_image(case / "b" / "mine" / "red_panda" / "0.jpg", 4343)


def other_checkpoint(case, fx):
    """FEATURES made with the shared CLIP; other.pt: other weights of the same architecture."""
    copied_features(case, fx)
    other_weights(case / "other.pt")


def as_fresh(dataset="dtd", root="data", clip="clip.pt"):
    """check of a stale features control: the rewritten file equals a fresh extraction of the case's inputs now
    (every tensor, path and hash), and differs from the stale one it replaced."""
    def check(case):
        settings = Settings(dataset if dataset == "dtd" else str(case / dataset), clip_checkpoint=str(case / clip),
                            seeds=(1,), max_shots=2, views=2)
        with quiet():
            path = extract_features(settings, case / root, case / "fresh", workers=0, device="cpu")
        now = torch.load(case / "features" / path.name, weights_only=True)
        fresh, before = (torch.load(p, weights_only=True) for p in (path, case / "before.pt"))
        problems = [f"{key} differs from a fresh extraction" for key in ("train", "val", "test", "text", "paths",
                                                                          "content", "fewshot", "classnames")
                    if not same(now.get(key), fresh.get(key))]
        if all(same(now.get(split), before.get(split)) for split in ("train", "val", "test")):
            problems.append("the stale features were kept")
        return problems
    return check


def same(a, b):
    """Two nested values equal, their tensors by torch.equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def prompts_added(case):
    """check of the prompt change: the file gained the new prompt set, and its image features are those it had."""
    now, before = (torch.load(p, weights_only=True) for p in (case / FEATURES, case / "before.pt"))
    problems = [] if len(now["texts"]) == 2 else [f"{len(now['texts'])} prompt sets, not 2"]
    return problems + [f"{split} features changed" for split in ("train", "val", "test")
                       if not same(now[split], before[split])]


def clip_recorded(change):
    """f.pt: dtd's features (extracted with the shared CLIP), their settings' record of that CLIP changed by
    change(settings, case folder, fixtures): what coop loads its text encoder from."""
    def prepare(case, fx):
        data = torch.load(fx.dtd_features, weights_only=True)
        change(data["settings"], case, fx)
        torch.save(data, case / "f.pt")
    return prepare


def weights_replaced(settings, case, fx):
    """The recorded checkpoint replaced since the extraction: the shared CLIP with its token embeddings permuted
    (same architecture and name, other text features)."""
    state = torch.load(fx.clip, weights_only=True)
    state["token_embedding.weight"] = state["token_embedding.weight"].flip(0)
    torch.save(state, case / "clip.pt")
    settings["clip_checkpoint"] = str(case / "clip.pt")


def results_json(case):
    """check of the train.py control: --out=~/control.json went to $HOME (the case's folder), complete."""
    if (case / "~").exists():
        return ["a folder named ~ was made"]
    r = json.loads((case / "control.json").read_text())
    return [] if r["test_accuracy"] >= 0 and r["recipe"]["epochs"] == 0 else ["control.json is not the run's"]



# -----------------------------------------------------------------------------
# the cases, by family: name -> (script, bad input, arguments, how to break the fixture)

@dataclass(frozen=True)
class Case:
    script: str                       # "train" or "extract"
    bad: str                          # the bad input, in words
    args: str                         # after COMMON; {name} is a shared fixture, other paths are the case's own
    prepare: Callable | None = None   # (case folder, fixtures): make the case's broken inputs
    control: bool = False             # not a bad input: must succeed
    check: Callable | None = None     # control: (case folder) -> problems
    rewrites: tuple = ()              # control: files of the case's folder it is meant to rewrite (a stale cache)
    family: str = ""                  # the kind of input it breaks: its key in FAMILIES


T, X, P = "train", "extract", "predict"
FAMILIES = {  # family -> {case name -> Case}
    "the features file": {
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
        "fewshot-bool": Case(T, "few-shot indices of type bool (a mask, not indices)", "--features f.pt --shots 2",
                             spoiled(lambda d: d["fewshot"].__setitem__(1, d["fewshot"][1].bool()))),
        "features-truncated": Case(T, "a truncated features `.pt`", "--features f.pt", cut("feats", "f.pt", 200)),
        "features-empty": Case(T, "an empty features `.pt`", "--features f.pt", cut("feats", "f.pt", 0)),
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
    },
    "numbers out of range": {
        "epochs-negative": Case(T, "`--epochs -1`", "--features {feats} --epochs -1"),
        "lr-zero": Case(T, "`--lr 0`", "--features {feats} --lr 0"),
        "batch-size-zero": Case(T, "`--batch-size 0`", "--features {feats} --batch-size 0"),
        "shots-zero": Case(T, "`--shots 0`", "--features {feats} --shots 0"),
        "shots-fractional": Case(T, "`--shots 2.5`", "--features {feats} --shots 2.5"),
        "seed-huge": Case(T, "`--seeds 18446744073709551616` (2^64)",
                          "--features {feats} --seeds 18446744073709551616"),
        "alpha-nan": Case(T, "`--alpha nan`", "--features {feats} --alpha nan"),
        "beta-inf": Case(T, "`--beta-vp inf`", "--features {feats} --beta-vp inf"),
        "gamma-zero": Case(T, "`--gamma 0`", "--features {feats} --method tip --gamma 0"),
        "ratio-above-1": Case(T, "`--ratio 1.5` for clip-adapter",
                              "--features {feats} --method clip-adapter --ratio 1.5"),
        "n-ctx-zero": Case(T, "`--n-ctx 0` for coop", "--features {feats} --method coop --n-ctx 0"),
        "encode-batch-size-zero": Case(X, "`--encode-batch-size 0`", "--dataset dtd --root {data} "
                                       "--encode-batch-size 0"),
        "workers-negative": Case(X, "`--workers -1`", "--dataset dtd --root {data} --workers -1"),
    },
    "the protocol and the methods": {
        "no-negatives": Case(T, "no negative text features, method hegraph", "--features f.pt --shots 2 --epochs 1",
                             spoiled(lambda d: d["text"].pop("negative"))),
        "other-dataset": Case(T, "`--features` of another dataset than `--dataset`",
                              "--features {feats} --dataset dtd"),
        "lr-diverges": Case(T, "`--lr 1e6`: the loss diverges", "--features {feats} --shots 4 --lr 1e6 --epochs 30 "
                                                                "--seeds 2"),
        "shots-above-file": Case(T, "`--shots 8`, above the features file's max-shots 4",
                                 "--features {feats} --shots 8"),
        "shots-above-max-shots": Case(T, "`--shots 32` above `--max-shots 2`, extracting on demand",
                                      "--dataset dtd --root {data} --shots 32"),
        "search-val-zeroshot": Case(T, "`--method zeroshot --search-val`",
                                    "--features {feats} --method zeroshot --search-val --shots 2"),
        "setting-of-another-method": Case(T, "`--ratio 0.5` for hegraph (CLIP-Adapter's setting)",
                                          "--features {feats} --ratio 0.5"),
        "unknown-dataset-train": Case(T, "an unknown `--dataset`", "--dataset fgvc"),
        "few-images": Case(T, "a class with fewer training images than `--max-shots`, extracting on demand",
                           "--dataset dtd --root data --max-shots 4 --shots 2", dataset(counts={"train": [5, 2, 6]})),
        "negative-template": Case(X, "`--negative-template` without `{}`", "--dataset dtd --root {data} "
                                  "--negative-template 'a photo of nothing.'"),
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
                                     "--seeds 1", checkpoints(lambda ck, fx: truncate(ck / "seed1.pt", 200))),
        "checkpoint-empty": Case(T, "an empty checkpoint `.pt`", "--features {feats} --eval-only --load ck --seeds 1",
                                 checkpoints(lambda ck, fx: truncate(ck / "seed1.pt", 0))),
        "checkpoint-older-config": Case(T, "a checkpoint whose config lacks a field added since (weight_scale)",
                                        "--features {feats} --eval-only --load ck --seeds 1",
                                        checkpoints(older_config)),
        "checkpoint-nan": Case(T, "NaN weights in a checkpoint", "--features {feats} --eval-only --load ck --seeds 1",
                               checkpoint_changed(lambda c: c["state_dict"]["b_p"].fill_(float("nan")))),
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
                               "--features {feats} --shots 2 --epochs 1 --out file/r.json", a_file("file")),
        "save-unwritable": Case(T, "an unwritable `--save` (its parent is a file)",
                                "--features {feats} --shots 2 --epochs 1 --save file/ck", a_file("file")),
        "out-is-the-features": Case(T, "`--out` the `--features` file itself", "--features f.pt --out f.pt --shots 2 "
                                    "--epochs 1", feats_copy),
        "out-is-a-folder": Case(T, "`--out` an existing folder", "--features {feats} --out folder --shots 2", a_folder),
        "out-is-a-pipe": Case(T, "`--out` a named pipe (a device-like node)", "--features {feats} --out pipe --shots 2",
                              a_pipe),
        "out-in-the-dataset": Case(T, "`--out` inside the dataset folder", "--dataset dtd --root {data} --shots 2 "
                                   "--out {data}/dtd/results.json"),
        "out-name-too-long": Case(T, "`--out` whose name is too long for the file system",
                                  "--features {feats} --shots 2 "
                                  "--out " + "r" * 250 + ".json"),
        "save-is-a-file": Case(T, "`--save` an existing file", "--features {feats} --shots 2 --save file",
                               a_file("file")),
    },
    "datasets and split files": {
        "missing-root": Case(X, "no dataset folder and no features file", "--dataset dtd --root absent"),
        "unknown-dataset-extract": Case(X, "an unknown `--dataset`", "--dataset fgvc --root {data}"),
        "fractional-label": Case(X, "a fractional label (1.7) in a split file", "--dataset dtd --root data",
                                 dataset(then=fractional_label)),
        "empty-class": Case(X, "a class with no training images", "--dataset dtd --root data",
                            dataset(counts={"train": [5, 0, 6]})),
        "unreadable-images": Case(X, "3 unreadable images (missing, text, empty)", "--dataset dtd --root data",
                                  dataset(then=unreadable_images)),
        "split-image-twice": Case(X, "a split file listing a training image in the test split too",
                                  "--dataset dtd --root data",
                                  split_changed(lambda s: s["test"].append(s["train"][0]))),
        "split-two-names": Case(X, "a split file giving one label two class names", "--dataset dtd --root data",
                                split_changed(lambda s: s["train"].append([s["train"][5][0], 0, "another name"]))),
        "split-path-not-a-name": Case(X, "a split file whose image path is a number", "--dataset dtd --root data",
                                      split_changed(lambda s: s["train"].append([7, 0, "class a_0"]))),
    },
    "backbones": {
        "clip-checkpoint-text": Case(X, "a text file as `--clip-checkpoint`", "--dataset dtd --root {data} "
                                     "--clip-checkpoint clip.txt", lambda case, fx: (case / "clip.txt").write_text(
                                         "model: ViT-B/32\n")),
        "backbone-not-the-checkpoints": Case(X, "`--backbone RN50` with a ViT `--clip-checkpoint`",
                                             "--dataset dtd --root {data} --backbone RN50"),
        "pretrained-with-checkpoint": Case(X, "`--pretrained openai` with a `--clip-checkpoint`",
                                           "--dataset dtd --root {data} --pretrained openai"),
    },
    "reusing a features file": {
        "absent-root-other-settings": Case(T, "absent `--root`, an existing features file made with `--views 2`",
                                           "--dataset dtd --root absent --views 3 --shots 2", copied_features),
        "features-before-open-clip": Case(T, "a features file extracted with OpenAI's clip package, before open_clip",
                                          "--dataset dtd --root {data} --shots 2", features_before_open_clip),
        "features-at-output-empty": Case(X, "an empty file at the features file's path", "--dataset dtd --root {data}",
                                         cut("feats", FEATURES, 0)),
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
    "devices": {
        "device-cuda-train": Case(T, "`--device cuda` on a machine without CUDA", "--features {feats} --device cuda"),
        "device-cuda-extract": Case(X, "`--device cuda` on a machine without CUDA", "--dataset dtd --root {data} "
                                    "--device cuda"),
        "device-meta": Case(T, "`--device meta`", "--features {feats} --device meta"),
        "device-mps": Case(T, "`--device mps` on a machine without MPS", "--features {feats} --device mps"),
        "device-xpu": Case(X, "`--device xpu`", "--dataset dtd --root {data} --device xpu"),
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

CASES = {name: dataclasses.replace(case, family=family) for family, cases in FAMILIES.items()
         for name, case in cases.items()}


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


def files_lost(before, after, root, rewritten=()):
    """Pre-existing files changed or deleted (but those `rewritten` on purpose, if complete), hidden .tmp left, new
    files that are half-written or stray."""
    name = lambda p: str(p.relative_to(root))
    lost = [f"changed {name(p)}" if p in after else f"deleted {name(p)}"
            for p, digest in before.items() if after.get(p) != digest and not (p in rewritten and complete(p))]
    for p in after.keys() - before.keys():
        if p.name.endswith(".tmp"):
            lost.append(f"left {name(p)}")
        elif p.name.startswith(".") and p.name.endswith(".lock") and p.stat().st_size == 0:
            continue                                            # file_lock's empty lock file: documented
        elif p.suffix not in (".pt", ".json") or not complete(p):
            lost.append(f"half-written or stray {name(p)}")
    return sorted(lost)


def command(script, args, fx):
    """The arguments of a case's command, after the script: COMMON [--out results.json] ARGS (predict.py:
    PREDICT_COMMON ARGS)."""
    common = PREDICT_COMMON if script == P else COMMON + (" --out results.json" if script == T else "")
    return shlex.split(f"{common} {args}".format_map(fx))


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


def prepare(name, case, folder, fx):
    """Make the case's folder, its broken inputs and its sentinels; returns its Outcome, to be run."""
    folder.mkdir(parents=True)
    (folder / "features").mkdir()
    (folder / "results.json").write_bytes(SENTINEL)               # train.py's --out, unless the case says other
    (folder / "features" / "previous.pt").write_bytes(SENTINEL)   # another file in the extraction's folder
    if case.prepare:
        case.prepare(folder, fx)
    return Outcome(name, case, command(case.script, case.args, fx), folder)


def judge(outcome, rc, stdout, stderr, before, fx):
    """What the case's command did (exit code, output) and the files after it, against what is promised."""
    folder = outcome.folder
    outcome.rc, outcome.stdout, outcome.stderr = rc, stdout, stderr
    shown = shown_lines(outcome.stderr)
    outcome.errors = [line for line in shown if line.startswith("error:")]
    outcome.others = [line for line in shown if not line.startswith("error:")]
    outcome.lost = files_lost(before, snapshot(folder, fx.dir), folder.parents[1],
                              {folder / rel for rel in outcome.case.rewrites})
    p = outcome.problems
    if outcome.case.control:
        if rc != 0 or outcome.errors:
            p.append(f"a control failed (exit {rc})")
        else:
            p += outcome.case.check(folder)
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
                   if flag not in flags_of(outcome.case.script)]
        if unknown:
            p.append(f"names {', '.join(unknown)}, not a flag of {outcome.case.script}")
    if outcome.lost:
        p.append("files lost")
    return outcome


def run_in_process(outcome, before, fx):
    """The case's command run in this process (cli's own entry point, as the script calls it), in the case's
    folder with HOME there, its output captured; then judged."""
    main = {T: cli.train_command, X: cli.extract_command, P: classify.predict_command}[outcome.case.script]
    out, err, cwd, home = io.StringIO(), io.StringIO(), os.getcwd(), os.environ.get("HOME")
    os.environ["HOME"] = str(outcome.folder)     # ~ is the case's folder: whatever is written there is checked
    os.chdir(outcome.folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(outcome.argv)
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(cwd)
        if home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = home
    return judge(outcome, rc, out.getvalue(), err.getvalue(), before, fx)
