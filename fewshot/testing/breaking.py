"""How the bad-input registry (bad_inputs.py) breaks a case's own copy of the inputs, the stand-ins a case's
command runs within, and the checks of what it did.

- prepare(case folder, fixtures): make the case's broken inputs in its folder (the shared fixtures are copied,
  never changed);
- within(case folder) -> a context manager: what the process running the command runs inside (a local server in
  place of a dataset's host, no network, a full disk, PIL's size limit lowered); it holds in that process only,
  in the tests' own process as in bench/bad_inputs.py's subprocesses;
- check(outcome) -> problems: what a control's success (or a refusal) must also show.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import fewshot.datasets as fd
from fewshot import download, pace
from fewshot.extraction import extract_features
from fewshot.features import Settings, load_features
from fewshot.testing.fixtures import (
    TINY_CLIPS,
    TINY_NAMES,
    openai_state_dict,
    redraw_image,
    write_dataset,
    write_image,
    write_image_folder,
)
from fewshot.testing.servers import Server, closed_port

FEATURES = f"features/dtd_{TINY_NAMES['vit']}.pt"  # the file the extraction cases and parallel runs write
VIT = TINY_NAMES["vit"]


# ----------------------------------------------------------------------------- features files and checkpoints

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


def checkpoint_changed(change):
    """ck/ with change(seed1.pt's checkpoint dict) applied."""
    def then(ck, fx):
        ckpt = torch.load(ck / "seed1.pt", weights_only=True)
        change(ckpt)
        torch.save(ckpt, ck / "seed1.pt")
    return checkpoints(then)


def other_classes(case, fx):
    """f.pt: the synthetic features with other class names (the checkpoints in ck/ are of the original)."""
    spoiled(lambda d: d.__setitem__("classnames", [f"other {c}" for c in d["classnames"]]))(case, fx)
    checkpoints()(case, fx)


def copied_features(case, fx):
    """FEATURES: dtd's features made with seeds 1, max-shots 2, views 2."""
    shutil.copy(fx.dtd_features, case / FEATURES)


def features_before_open_clip(case, fx):
    """FEATURES as extract_features.py wrote it with OpenAI's clip package: its settings name no weights."""
    data = torch.load(fx.dtd_features, weights_only=True)
    del data["settings"]["pretrained"]
    torch.save(data, case / FEATURES)


def feats_copy(case, fx):
    """f.pt: a copy of the synthetic features (an input the case's output may not overwrite)."""
    shutil.copy(fx.feats, case / "f.pt")


# ----------------------------------------------------------------------------- files of the wrong kind

def a_file(name):
    """A plain file where a folder is needed: --out name/r.json and --save name/ck cannot be written."""
    def prepare(case, fx):
        (case / name).write_text("a file, not a folder\n")
    return prepare


def a_folder(case, fx):
    (case / "folder").mkdir()


def a_pipe(case, fx):
    os.mkfifo(case / "pipe")


def fifo(name):
    """name: a named pipe (FIFO), which blocks whoever opens it for reading until someone writes."""
    def prepare(case, fx):
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(case / name)
    return prepare


# ----------------------------------------------------------------------------- datasets in CoOp's layout

def dataset(counts=None, then=None):
    """data/: a fresh dtd dataset of the case's own, then then(images folder, split file)."""
    def prepare(case, fx):
        write_dataset(case / "data", "dtd", counts=counts)
        spec = fd.DATASETS["dtd"]
        if then:
            then(case / "data" / spec.folder / spec.images, case / "data" / spec.folder / spec.split)
    return prepare


def split_changed(change):
    """data/: a dtd dataset whose split file has change(split) applied."""
    def then(images, split_file):
        split = json.loads(split_file.read_text())
        change(split)
        split_file.write_text(json.dumps(split))
    return dataset(then=then)


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


def truncated_image(images, split_file):
    """A test JPEG cut after its header: it opens, and fails only when decoded."""
    path = images / "class b_1" / "test_0.jpg"
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"\xff\xda") + 20])


def test_image_a_fifo(images, split_file):
    """A test image replaced by a named pipe: opening it would wait for ever."""
    (images / "class a_0" / "test_0.jpg").unlink()
    os.mkfifo(images / "class a_0" / "test_0.jpg")


def split_file_a_fifo(images, split_file):
    split_file.unlink()
    os.mkfifo(split_file)


def sixteen_bit_png(images, split_file):
    """A 16-bit grey PNG in the test split, and its 8-bit twin (same picture): both must encode alike."""
    gray = np.random.default_rng(0).integers(0, 256, (36, 48), dtype=np.uint8)
    Image.fromarray(gray).save(images / "class a_0" / "test_8bit.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "class a_0" / "test_16bit.png")
    assert Image.open(images / "class a_0" / "test_16bit.png").mode == "I;16"
    split = json.loads(split_file.read_text())
    split["test"] += [[f"class a_0/test_{b}.png", 0, "class a_0"] for b in ("8bit", "16bit")]
    split_file.write_text(json.dumps(split))


def nan_tiff(images, split_file):
    """A float TIFF (mode F) with NaN and infinite pixels in the test split."""
    x = np.random.default_rng(0).random((36, 48)).astype(np.float32)
    x[3:9, 5:20], x[0, 0] = np.nan, np.inf
    Image.fromarray(x, mode="F").save(images / "class a_0" / "test_nan.tif")
    split = json.loads(split_file.read_text())
    split["test"].append(["class a_0/test_nan.tif", 0, "class a_0"])
    split_file.write_text(json.dumps(split))


def split_paths(*paths):
    """data/: a dtd dataset whose split file lists these extra training paths of class 0 (a path may be a
    callable of the case folder, e.g. an absolute path into it)."""
    def prepare(case, fx):
        dataset()(case, fx)
        split_file = case / "data" / "dtd" / fd.DATASETS["dtd"].split
        split = json.loads(split_file.read_text())
        split["train"] += [[p(case) if callable(p) else p, 0, "class a_0"] for p in paths]
        split_file.write_text(json.dumps(split))
        write_image(case / "data" / "outside.jpg", 99)      # what "../outside.jpg" would have read
    return prepare


def without_split_file(images, split_file):
    split_file.unlink()


# ----------------------------------------------------------------------------- folders of your own

FOLDER = {"red": 10, "green": 10, "blue": 10}  # 5 training, 2 validation, 3 test images per class


def image_folder(then=None, name="mine", counts=None):
    """name/: a folder dataset of the case's own (FOLDER's classes of generated JPEGs), then then(folder)."""
    def prepare(case, fx):
        folder = write_image_folder(case / name, counts or FOLDER)
        if then:
            then(folder)
    return prepare


def touched(*names, name="mine"):
    """name/: a folder of empty files with these names (its layout is refused before anything is decoded)."""
    def prepare(case, fx):
        for n in names:
            (case / name / n).parent.mkdir(parents=True, exist_ok=True)
            (case / name / n).write_bytes(b"")
    return prepare


def link(at, to):
    """folder/at: a symbolic link to folder/to (`to` relative to the folder, or absolute)."""
    def then(folder):
        os.symlink(to if os.path.isabs(to) else os.path.relpath(folder / to, (folder / at).parent), folder / at)
    return then


def link_out(folder):
    """red/more: a link to a folder of images outside the dataset."""
    outside = folder.parent / "elsewhere"
    write_image_folder(outside, {"more": 3})
    os.symlink(outside / "more", folder / "red" / "more")


def image_twice(folder):
    """red/again.jpg: a link to red/0.jpg, the same image reached twice."""
    os.symlink("0.jpg", folder / "red" / "again.jpg")


def folder_fifo(folder):
    os.mkfifo(folder / "red" / "pipe.jpg")


NOT_UTF8 = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not a UTF-8 name


def latin1_class(folder):
    """A class folder whose name is Latin-1 bytes, not UTF-8."""
    os.rename(folder / "red", folder / NOT_UTF8)


def latin1_image(folder):
    """An image whose file name is Latin-1 bytes (the class names stay UTF-8)."""
    os.rename(folder / "red" / "0.jpg", folder / "red" / f"{NOT_UTF8}.jpg")


def classes_here(case, fx):
    """The case folder itself is the dataset (--dataset .), with its features/ (COMMON's --features-dir) inside."""
    write_image_folder(case, FOLDER)


def dtd_folder_beside_dtd(case, fx):
    """A folder dataset named dtd (./dtd) beside the benchmark dtd's features file at FEATURES."""
    write_image_folder(case / "dtd", FOLDER)
    shutil.copy(fx.dtd_features, case / FEATURES)


# ----------------------------------------------------------------------------- CLIPs

def clip_changed(change):
    """clip.pt: a copy of the tiny ViT checkpoint with change(state dict) applied."""
    def prepare(case, fx):
        state = torch.load(fx.clip, weights_only=True)
        change(state)
        torch.save(state, case / "clip.pt")
    return prepare


def local_dir(then=None):
    """oc/: a copy of the tiny open_clip folder (open_clip_config.json, open_clip_model.safetensors), then
    then(folder)."""
    def prepare(case, fx):
        shutil.copytree(fx.openclip, case / "oc")
        if then:
            then(case / "oc")
    return prepare


def weights_changed(change):
    """oc/'s weights with change(state dict) applied."""
    def then(folder):
        from safetensors.torch import load_file, save_file
        state = load_file(folder / "open_clip_model.safetensors")
        change(state)
        save_file(state, str(folder / "open_clip_model.safetensors"))
    return then


def no_weights(folder):
    (folder / "open_clip_model.safetensors").unlink()


def config_text(text):
    def then(folder):
        (folder / "open_clip_config.json").write_text(text)
    return then


# ----------------------------------------------------------------------------- downloads

def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dtd_source(case: Path) -> tuple[Path, bytes]:
    """A small dtd in its download's form: the images folder (dtd/images/...) and CoOp's split file's bytes."""
    root = write_dataset(case / "source", "dtd")
    split = root / "dtd" / fd.DATASETS["dtd"].split
    data = split.read_bytes()
    split.unlink()
    return root / "dtd", data


def served_archive(evil=None, kind="tar"):
    """served/: what the stand-in host serves for dtd (split.json and dtd-r1.0.1.tar.gz, or dtd.zip), the
    archive holding dtd/... and, if given, the members evil(archive) adds."""
    def prepare(case, fx):
        images, split = _dtd_source(case)
        served = case / "served"
        served.mkdir()
        (served / "split.json").write_bytes(split)
        if kind == "tar":
            with tarfile.open(served / "dtd-r1.0.1.tar.gz", "w:gz") as tar:
                tar.add(images, arcname="dtd")
                if evil:
                    evil(tar)
        else:
            with zipfile.ZipFile(served / "dtd.zip", "w") as z:
                for p in sorted(images.rglob("*")):
                    z.write(p, f"dtd/{p.relative_to(images)}")
                if evil:
                    evil(z)
        shutil.rmtree(case / "source")
    return prepare


def tar_member(name, kind=tarfile.REGTYPE, target="", data=b"ESCAPED"):
    """A tar member: a file of `data`, or a link (SYMTYPE, LNKTYPE) to `target`, or a FIFO (FIFOTYPE)."""
    def add(tar):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return add


def zip_member(name, mode=0o100644, data=b"ESCAPED"):
    """A zip member of that name and Unix mode (0o120777: a link to `data`)."""
    def add(z):
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        z.writestr(info, data)
    return add


def _plan(url_of, served: Path) -> download.DatasetDownload:
    """DOWNLOADS["dtd"] as the stand-in host serves it: the split file first, then the archive, each pinned by
    the md5 of what is served."""
    archive = next(p for p in sorted(served.iterdir()) if p.name != "split.json")
    return download.DatasetDownload((
        download.Remote(url_of("split.json"), _md5(served / "split.json"), "dtd", fd.DATASETS["dtd"].split),
        download.Remote(url_of(archive.name), _md5(archive), "", size=archive.stat().st_size)))


def serving(fault=None, **limits):
    """within: a server on 127.0.0.1 serving served/ as dtd's host, the archive with `fault` ("trickle",
    "silent", 500, ...), download's STALL_S / GRACE_S / MIN_RATE set to `limits`."""
    @contextlib.contextmanager
    def within(case):
        served = case / "served"
        with Server(served) as server, mock.patch.dict(download.DOWNLOADS, {"dtd": _plan(
                lambda name: f"{server.url}/{name}", served)}), mock.patch.multiple(download, **limits) if limits else \
                contextlib.nullcontext():
            if fault:
                archive = next(p.name for p in served.iterdir() if p.name != "split.json")
                server.faults[f"/{archive}"] = fault
            yield
    return within


@contextlib.contextmanager
def no_network(case):
    """within: dtd's files on a host that refuses every connection (as without a network)."""
    port = closed_port()
    served = case / "served"
    with mock.patch.dict(download.DOWNLOADS, {"dtd": _plan(lambda name: f"http://127.0.0.1:{port}/{name}",
                                                          served)}):
        yield


def hand_placed(name, data=b"not the archive"):
    """data/dtd.download/NAME: a file put there by hand (here: one of the wrong content)."""
    def prepare(case, fx):
        served_archive()(case, fx)
        staging = case / "data" / "dtd.download"
        staging.mkdir(parents=True)
        (staging / name).write_bytes(data)
    return prepare


# ----------------------------------------------------------------------------- stale features files

@contextlib.contextmanager
def quiet():
    """Silence an in-process run (its table, its progress bars) while building fixtures."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# made in the case's folder, then made stale; the rerun must redo exactly that work

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
    def check(outcome):
        case = outcome.folder
        settings = Settings(dataset if dataset == "dtd" else str(case / dataset), clip_checkpoint=str(case / clip),
                            seeds=(1,), max_shots=2, views=2)
        with quiet():
            path = extract_features(settings, case / root, case / "fresh", workers=0, device="cpu")
        now = torch.load(case / "features" / path.name, weights_only=True)
        fresh, before = (torch.load(p, weights_only=True) for p in (path, case / "before.pt"))
        problems = [f"{key} differs from a fresh extraction" for key in ("train", "val", "test", "text", "paths",
                                                                          "content", "fewshot", "classnames")
                    if not same(now.get(key), fresh.get(key), close)]
        if all(same(now.get(split), before.get(split)) for split in ("train", "val", "test")):
            problems.append("the stale features were kept")
        return problems
    return check


def same(a, b, equal=torch.equal):
    """Two nested values equal, their tensors (of one shape) by `equal`."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same(a[k], b[k], equal) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, equal) for x, y in zip(a, b))
    return a == b


def close(a, b) -> bool:
    """Features (float16 rows) that match to pace.MATCH, row by row, other tensors equal: an image encoded in
    another batch differs in its last bits (at bf16 in its last bf16 bits), so a grown file is a fresh
    extraction's to that cosine, not bit for bit."""
    if a.dtype != torch.float16 or a.dim() < 2:
        return torch.equal(a, b)
    return bool((F.cosine_similarity(a.float(), b.float(), dim=-1) >= pace.MATCH).all())


def prompts_added(outcome):
    """check of the prompt change: the file gained the new prompt set, and its image features are those it had."""
    case = outcome.folder
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



# ----------------------------------------------------------------------------- the machine

@contextlib.contextmanager
def environ(**values):
    """os.environ with these values (None: unset), restored after."""
    before = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def hub(offline_flag):
    """within: an empty Hugging Face cache, and a hub that cannot be reached: HF_HUB_OFFLINE set, or (offline_flag
    False) a hub endpoint on a closed port, as without a network."""
    def within(case):
        return environ(HF_HOME=str(case / "hf"), HF_HUB_CACHE=None, HF_HUB_OFFLINE="1" if offline_flag else None,
                       HF_ENDPOINT=None if offline_flag else f"http://127.0.0.1:{closed_port()}")
    return within


def disk_free(free_bytes):
    """within: every disk reports only `free_bytes` free (shutil.disk_usage, which the checks of room ask)."""
    def within(case):
        return mock.patch.object(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
            10**12, 10**12 - free_bytes, free_bytes))
    return within


def pil_limit(pixels):
    """within: PIL's decompression-bomb limit lowered to `pixels` (the tiny images then count as huge)."""
    def within(case):
        return mock.patch.object(Image, "MAX_IMAGE_PIXELS", pixels)
    return within


def both(*withins):
    """within: all of these at once."""
    @contextlib.contextmanager
    def within(case):
        with contextlib.ExitStack() as stack:
            for w in withins:
                stack.enter_context(w(case))
            yield
    return within


# ----------------------------------------------------------------------------- checks

def same_16_and_8_bit_features(outcome):
    """The features file is complete and the 16-bit image equals its 8-bit twin."""
    data = load_features(outcome.folder / FEATURES)
    paths = data["paths"]["test"]
    eight, sixteen = (data["test"]["features"][paths.index(f"class a_0/test_{b}.png")] for b in ("8bit", "16bit"))
    return [] if torch.equal(eight, sixteen) else ["the 16-bit PNG's features differ from its 8-bit twin's"]


def results_json(outcome):
    """--out=~/control.json went to $HOME (the case's folder), complete."""
    case = outcome.folder
    if (case / "~").exists():
        return ["a folder named ~ was made"]
    r = json.loads((case / "control.json").read_text())
    return [] if r["test_accuracy"] >= 0 and r["recipe"]["epochs"] == 0 else ["control.json is not the run's"]


def results_json_of(epochs):
    """A train.py control's check: out.json (its --out) holds this run's results, trained `epochs` epochs."""
    def check(outcome):
        r = json.loads((outcome.folder / "out.json").read_text())
        return [] if r["test_accuracy"] >= 0 and r["recipe"]["epochs"] == epochs else ["out.json is not the run's"]
    return check


def warned(*words, file=FEATURES, paths=None):
    """A control's check: exactly one stderr line, a warning holding `words`; the features file `file` loads
    and, with paths=callable(all paths) -> problems, its image paths pass."""
    def check(outcome):
        shown = outcome.others + outcome.errors
        problems = [] if len(shown) == 1 and shown[0].startswith("warning:") and all(w in shown[0] for w in words) \
            else [f"not one warning with {words}: {shown[:3]}"]
        if problems:
            return problems
        data = load_features(outcome.folder / file)
        every = [p for split in data["paths"].values() for p in split]
        return paths(every) if paths else []
    return check


def silent(file, paths=None, classes=None):
    """A control's check: no stderr line; the features file loads, with these class names, and its paths pass."""
    def check(outcome):
        problems = [f"stderr: {outcome.others[:2]}"] if outcome.others else []
        data = load_features(outcome.folder / file)
        every = [p for split in data["paths"].values() for p in split]
        if classes is not None and data["classnames"] != classes:
            problems.append(f"classes {data['classnames']}, not {classes}")
        return problems + (paths(every) if paths else [])
    return check


def none_under(prefix):
    """paths check: no image path starts with `prefix` (a link that must not have been followed)."""
    return lambda every: [f"{p} was read" for p in every if p.startswith(prefix)]


def once(a, b):
    """paths check: of two names of one image, exactly one is used."""
    return lambda every: [] if (a in every) + (b in every) <= 1 else [f"{a} and {b} (one image) are both used"]


def no_file(*names):
    """check: none of these files (relative to the case folder) was written."""
    return lambda outcome: [f"{n} was written" for n in names if (outcome.folder / n).exists()]


def listed(*words):
    """check: stdout (where the steps and the list of files to fetch go) holds every one of `words`
    ({case} in a word: the case's folder)."""
    def check(outcome):
        return [f"stdout lacks {w.format(case=outcome.folder)!r}" for w in words
                if w.format(case=outcome.folder) not in outcome.stdout]
    return check


def classes_here_only(outcome):
    """--dataset . in the case folder: its classes are the image folders, not features/ (the --features-dir)."""
    data = load_features(outcome.folder / f"features/{outcome.folder.name}_{VIT}.pt")
    return [] if data["classnames"] == ["blue", "green", "red"] else [f"classes {data['classnames']}"]
