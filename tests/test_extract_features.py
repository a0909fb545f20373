"""End-to-end tests of extract_features.py on tiny random CLIPs and tiny generated datasets (CPU, no downloads)."""
import errno
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fewshot.datasets as fd
import fewshot.extraction as ef
import fewshot.features as ff
import fewshot.files as files
from fewshot import backbones, download, pace, prompts
from fewshot import cli as commands
from fewshot.errors import DataError
from fewshot.testing.fixtures import TINY_NAMES

VIT, RESNET = TINY_NAMES["vit"], TINY_NAMES["resnet"]  # the tiny checkpoints' names, read from their weights

REPO = Path(__file__).resolve().parents[1]
FAST = dict(seeds=(1, 2), max_shots=4, views=3, workers=0, device="cpu")  # shared by the function runs


def extract(dataset, root, out, backbone=None, *, batch_size=None, workers=None, device=None, overwrite=False,
            **settings):
    """extract_features with the settings as keywords, as the command line gives them."""
    return ef.extract_features(ff.Settings(dataset, backbone, **settings), root, out, batch_size=batch_size,
                               workers=workers, device=device, overwrite=overwrite)


def run(root, out, checkpoint, dataset="dtd", **kwargs):
    """extract_features with the tiny settings, returning the loaded file and its path."""
    path = extract(dataset, root, out, clip_checkpoint=checkpoint, **{**FAST, **kwargs})
    return torch.load(path, weights_only=True), path


def assert_unit(x: torch.Tensor):
    assert x.dtype == torch.float16
    assert torch.allclose(x.float().norm(dim=-1), torch.ones(()), atol=2e-3)


@pytest.fixture(scope="module")
def cli(tmp_path_factory, make_dataset, tiny_vit_checkpoint):
    """The one run through the command line (with loader workers): root, file path, stdout, loaded file."""
    root, out = make_dataset("dtd"), tmp_path_factory.mktemp("out")
    cmd = [sys.executable, str(REPO / "extract_features.py"), "--dataset", "dtd", "--root", str(root),
           "--features-dir", str(out), "--clip-checkpoint", str(tiny_vit_checkpoint),
           "--seeds", "1", "2", "--max-shots", "5", "--views", "3", "--workers", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in conftest.py: tiny models, busy machine
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    path = ff.features_path(out, "dtd", VIT)
    return root, path, proc.stdout, torch.load(path, weights_only=True)


def test_cli_writes_the_documented_format(cli):
    _, path, stdout, f = cli
    assert path.name == f"dtd_{VIT}.pt" and "views/s" in stdout
    assert f["format"] == "hegraphadapter-features-v2" and f["dataset"] == "dtd" and f["backbone"] == VIT
    assert f["settings"]["backbone"] == VIT and f["settings"]["pretrained"] is None
    assert f["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)  # the checkpoint's own, not a constant 100
    C, d = 3, 32
    # from the split file, in label order, as the prompts say them (CoOp's rule: underscores as spaces)
    assert f["classnames"] == ["class a 0", "class b 1", "class c 2"]
    assert f["prompts"]["positive"] == [[f"{c} texture."] for c in f["classnames"]]  # DTD's CoOp template
    assert f["prompts"]["negative"] == [[f"a photo of no {c}."] for c in f["classnames"]]
    for t in f["text"].values():
        assert t.shape == (C, d)
        assert_unit(t)
    V, N, _ = f["train"]["features"].shape
    assert (V, d) == (3, 32) and f["train"]["labels"].shape == (N,) and f["train"]["labels"].dtype == torch.long
    assert_unit(f["train"]["features"])
    assert N <= 2 * C * 5  # only the images some seed needs, each once
    for split in ("val", "test"):
        assert f[split]["features"].dim() == 2 and f[split]["features"].shape[1] == d
        assert f[split]["labels"].shape == f[split]["features"].shape[:1]
        assert_unit(f[split]["features"])
    assert f["test"]["features"].shape[0] == 7  # the whole test split
    assert set(f["fewshot"]) == set(f["val_fewshot"]) == {1, 2}
    assert "class_map" not in f


def test_fewshot_subsets_follow_the_seed_alone(cli):
    root, _, _, f = cli
    splits = fd.load_splits("dtd", root)
    for seed, rows in f["fewshot"].items():
        assert rows.shape == (3, 5) and rows.dtype == torch.long
        # each row of class c is an image of class c, with no repeats (every class has >= 5 images)
        assert (f["train"]["labels"][rows] == torch.arange(3)[:, None]).all()
        assert all(len(set(r.tolist())) == 5 for r in rows)
        # the subset is a function of the seed and the sorted split only: recomputable anywhere
        expected = fd.sample_fewshot([y for _, y in splits.train], 3, 5, seed)
        assert [[f["paths"]["train"][i] for i in r] for r in rows.tolist()] == \
               [[splits.train[i][0] for i in r] for r in expected.tolist()]
    assert not torch.equal(f["fewshot"][1], f["fewshot"][2])


def test_subsets_are_nested():
    labels = [0] * 9 + [1] * 17 + [2] * 5  # unequal classes
    big = fd.sample_fewshot(labels, 3, 5, seed=3)
    for k in (1, 2, 4):
        assert torch.equal(fd.sample_fewshot(labels, 3, k, seed=3), big[:, :k])


def test_val_is_capped_at_min_k_4(cli, make_dataset, tiny_vit_checkpoint, tmp_path):
    f = cli[3]
    assert all(v.shape == (3, 4) for v in f["val_fewshot"].values())  # K = 5 -> 4
    for rows in f["val_fewshot"].values():
        assert (f["val"]["labels"][rows] == torch.arange(3)[:, None]).all()
    g, _ = run(make_dataset("oxford_pets"), tmp_path, tiny_vit_checkpoint, "oxford_pets", max_shots=2)
    assert all(v.shape == (3, 2) for v in g["val_fewshot"].values())  # K = 2 -> 2
    assert all(r.shape == (3, 2) for r in g["fewshot"].values())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # load_openai_model tries the deprecated torch.jit.load
def test_view_0_is_clips_preprocessing(cli, tiny_vit_checkpoint):
    root, _, _, f = cli
    oc = backbones.import_open_clip()   # open_clip's own loader of OpenAI files and its OpenAI-default transform
    model = oc.load_openai_model(str(tiny_vit_checkpoint), precision="fp32", device="cpu")
    preprocess = oc.image_transform(model.visual.image_size, is_train=False)
    images = fd.load_splits("dtd", root).images
    x = torch.stack([preprocess(Image.open(images / p)) for p in f["paths"]["train"][:4]])
    with torch.no_grad():
        expected = F.normalize(model.encode_image(x).float(), dim=-1)
    # at the precision the command chose (--precision auto: bf16 on a CPU that has it), within what it promises;
    # test_backbones.py holds the fp32 path to 0.99999 of OpenAI's own package
    assert F.cosine_similarity(f["train"]["features"][0, :4].float(), expected).min() >= pace.MATCH
    assert not torch.allclose(f["train"]["features"][1], f["train"]["features"][2])  # augmented views differ


def test_16_bit_images_are_scaled_to_8_bits_not_clipped_to_white(tiny_vit_checkpoint, tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (36, 48), dtype=np.uint8)          # [H, W]
    Image.fromarray(gray).save(tmp_path / "8bit.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16bit.png")        # 0..65535
    Image.fromarray(np.full_like(gray, 255)).save(tmp_path / "white.png")
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    device = torch.device("cpu")
    encoder = backbones.load(backbones.resolve(ff.Settings("dtd", clip_checkpoint=str(tiny_vit_checkpoint))), device)
    views = ef.Views(encoder.transform, encoder.preprocess, 1)
    files = ef.ImageFiles(tmp_path, ["8bit.png", "16bit.png", "white.png"], views)
    eight, sixteen, white = ef.encode_images(encoder, files, pace.Pace(batch_size=8), device, "test")[0].float()
    assert torch.equal(eight, sixteen)
    assert F.cosine_similarity(sixteen, white, dim=0) < 0.99
    # the other wide modes: big-endian 16-bit, 32-bit integers holding 16-bit values, floats in 0..1
    for wide in ((gray.astype(np.uint16) * 257).astype(">u2"), gray.astype(np.int32) * 257,
                 gray.astype(np.float32) / 255):
        image = Image.fromarray(wide)                                                   # I;16B, I, F
        assert np.array_equal(np.asarray(ef.to_rgb(image))[..., 0], gray), image.mode
    # values outside the mode's range are scaled by the image's own min..max
    assert np.asarray(ef.to_rgb(Image.fromarray(gray.astype(np.float32) * 4 - 300))).max() == 255


def test_nan_and_infinite_pixels_are_black_and_the_others_keep_their_values(recwarn):
    """A float image with NaN and infinite pixels: those become black, the others scale as without them, and no
    warning of numpy's (invalid value in cast) is raised (the extraction says it once, in its words)."""
    x = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    spoiled = x.copy()
    spoiled[0, 1], spoiled[2, 2] = np.nan, np.inf
    clean, out = (np.asarray(ef.to_rgb(Image.fromarray(a, mode="F")))[..., 0] for a in (x, spoiled))
    assert out[0, 1] == out[2, 2] == 0
    keep = np.isfinite(spoiled)
    assert (out[keep] == clean[keep]).all() and not recwarn.list


def test_same_settings_give_the_same_file_and_are_reused(cli, tiny_vit_checkpoint, tmp_path, capsys):
    root, first, _, _ = cli
    # the same seeds and settings without loader workers, into another folder: the identical bytes, but for the
    # record of how it was encoded (its workers)
    _, again = run(root, tmp_path, tiny_vit_checkpoint, max_shots=5, workers=0)
    (a, b), saved = [torch.load(p, weights_only=True) for p in (first, again)], []
    assert (a.pop("encoding")["workers"], b.pop("encoding")["workers"]) == (2, 0)
    for f in (a, b):
        saved.append(io.BytesIO())
        torch.save(f, saved[-1])
    assert saved[0].getvalue() == saved[1].getvalue()
    stamp = again.stat().st_mtime_ns
    capsys.readouterr()
    run(root, tmp_path, tiny_vit_checkpoint, max_shots=5)
    assert "reusing" in capsys.readouterr().out and again.stat().st_mtime_ns == stamp


def test_a_file_with_more_seeds_shots_and_views_serves_fewer_as_it_is(cli, tiny_vit_checkpoint, capsys):
    root, path, _, _ = cli                                    # seeds 1 2, max-shots 5, views 3
    stamp = path.stat().st_mtime_ns
    capsys.readouterr()
    assert extract("dtd", root, path.parent, clip_checkpoint=tiny_vit_checkpoint, seeds=(2,),
                   max_shots=3, views=2, workers=0, device="cpu") == path
    assert "reusing" in capsys.readouterr().out and path.stat().st_mtime_ns == stamp


def test_reusing_a_file_takes_no_lock(cli, tiny_vit_checkpoint, monkeypatch, capsys):
    def no_lock(path):  # as in a read-only shared features folder, where no lock file can be made
        raise PermissionError(f"read-only: {path}")
    monkeypatch.setattr(files, "file_lock", no_lock)
    root, path, _, _ = cli
    capsys.readouterr()
    run(root, path.parent, tiny_vit_checkpoint, max_shots=5)
    assert "reusing" in capsys.readouterr().out


@pytest.mark.parametrize("first, second", [(dict(seeds=(1,)), dict(seeds=(2,))),    # per-seed jobs on one file
                                           (dict(views=3), dict(views=2))])
def test_concurrent_extractions_take_turns_and_the_file_serves_both(make_dataset, tiny_vit_checkpoint, tmp_path,
                                                                     capfd, first, second):
    root, context = make_dataset("dtd"), multiprocessing.get_context("fork")
    start, outcomes = context.Barrier(2), context.Queue()

    def job(name, kwargs):  # both start their check at once: without the lock, both write, the last one wins
        start.wait()
        try:  # fp32: the file grown by two runs is then a fresh extraction's, tensor for tensor
            run(root, tmp_path, tiny_vit_checkpoint, precision="fp32", **kwargs)
            outcomes.put((name, "served"))
        except DataError as e:
            outcomes.put((name, str(e)))
    jobs = [context.Process(target=job, args=args) for args in (("first", first), ("second", second))]
    for p in jobs:
        p.start()
    for p in jobs:
        p.join(timeout=120)
    assert [p.exitcode for p in jobs] == [0, 0]
    assert dict(outcomes.get(timeout=10) for _ in jobs) == {"first": "served", "second": "served"}
    assert "waiting for another process to finish writing" in capfd.readouterr().out
    # the second planned again with what the first wrote: the file holds both runs' asks, as one extraction would
    union = {**FAST, "seeds": tuple(sorted({*first.get("seeds", FAST["seeds"]), *second.get("seeds", FAST["seeds"])})),
             "views": max(first.get("views", FAST["views"]), second.get("views", FAST["views"]))}
    made = torch.load(ff.features_path(tmp_path, "dtd", VIT), weights_only=True)
    alone, _ = run(root, tmp_path / "alone", tiny_vit_checkpoint, precision="fp32", **union)
    assert made["settings"]["seeds"] in (list(union["seeds"]), list(union["seeds"])[::-1])
    for split in ("train", "val", "test"):
        order = [made["paths"][split].index(p) for p in alone["paths"][split]]
        # within one float16 unit in the last place: an image encoded in another batch (test_features_cache.py)
        a, b = made[split]["features"][..., order, :].float(), alone[split]["features"].float()
        assert ((a - b).abs() <= 2 ** -10 * b.abs() + 2 ** -24).all()


def test_without_the_dataset_folder_a_file_serves_only_what_it_holds(cli, tiny_vit_checkpoint, tmp_path, capsys):
    path = tmp_path / cli[1].name                           # a copy: this test adds a prompt set to it
    shutil.copy(cli[1], path)                               # seeds 1 2, max-shots 5, views 3, DTD's template
    stamp, absent = path.stat().st_mtime_ns, tmp_path / "no-data"
    again = lambda overwrite=False, **kw: ef.extract(ff.Settings("dtd", **{
        "clip_checkpoint": str(tiny_vit_checkpoint), "views": 3, "seeds": (1, 2), "max_shots": 5, **kw}),
        absent, tmp_path, workers=0, device="cpu", overwrite=overwrite)
    capsys.readouterr()
    assert again(seeds=(2,), max_shots=3, views=2).path == path  # fewer seeds, shots and views serve
    assert f"(the dataset folder {absent / 'dtd'} is absent)" in capsys.readouterr().out
    copied = tmp_path / "clip.pt"
    copied.write_bytes(tiny_vit_checkpoint.read_bytes())   # the same weights elsewhere are the same weights
    assert again(clip_checkpoint=str(copied)).path == path and path.stat().st_mtime_ns == stamp
    other = tmp_path / "other.pt"
    torch.save({k: -v if k == "text_projection" else v for k, v in torch.load(tiny_vit_checkpoint).items()}, other)
    for kwargs, setting in ((dict(views=4), "views: 3 in the file, 4 asked"),
                            (dict(seeds=(3,)), "seeds [1, 2] and max-shots 5 in the file"),
                            (dict(max_shots=6), "seeds [1, 2] and max-shots 5 in the file"),
                            (dict(clip_checkpoint=str(other)), "other weights than this run asks for")):
        with pytest.raises(DataError) as e:
            again(**kwargs)
        assert setting in str(e.value) and "\n" not in str(e.value), str(e.value)
        if "weights" not in setting:
            assert f"the dataset folder {absent / 'dtd'} is absent" in str(e.value)
    with pytest.raises(DataError, match="dataset folder not found"):  # --overwrite cannot extract either
        again(overwrite=True)
    assert path.stat().st_mtime_ns == stamp
    # other prompts need the text encoder only, not the images: added without the dataset
    done = again(negative_template="not a {}.")
    assert (done.images, done.texts) == (0, 1) and len(torch.load(path, weights_only=True)["texts"]) == 2
    assert ff.load_features(path, text=done.text)["prompts"]["negative"][0] == ["not a class a 0."]
    # a file another tool wrote records no settings: no extraction flag applies to it, it is used as it is
    torch.save({"format": ff.FORMAT, "classnames": ["a"]}, tmp_path / "dtd_other.pt")
    assert extract("dtd", absent, tmp_path, "other", views=2) == tmp_path / "dtd_other.pt"
    assert "records no extraction settings, so it is used as it is" in capsys.readouterr().out


def test_overwrite_extracts_afresh(make_dataset, tiny_resnet_checkpoint, tmp_path):
    root = make_dataset("eurosat")
    f, path = run(root, tmp_path, tiny_resnet_checkpoint, "eurosat")
    g, _ = run(root, tmp_path, tiny_resnet_checkpoint, "eurosat", views=2, seeds=(3,), overwrite=True)
    assert g["train"]["features"].shape[0] == 2 and f["train"]["features"].shape[0] == 3
    assert list(g["fewshot"]) == [3] and g["settings"]["seeds"] == [3]    # what this run asked for, not more


def test_interrupted_write_leaves_no_file(make_dataset, tiny_vit_checkpoint, tmp_path, monkeypatch):
    def save_half(obj, file):  # killed half-way through writing
        file.write(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(KeyboardInterrupt):
        run(make_dataset("ucf101"), tmp_path, tiny_vit_checkpoint, "ucf101")
    assert [p.name for p in tmp_path.iterdir()] == [f".ucf101_{VIT}.pt.lock"]  # only file_lock's empty file


def test_a_disk_that_fills_up_during_the_write_says_how_much_room_and_where(make_dataset, tiny_vit_checkpoint,
                                                                           tmp_path, monkeypatch):
    """ENOSPC from inside torch.save (which turns it into a RuntimeError naming no cause): the line says how much
    the file needs and where; no file and no temporary file is left. (A disk without that room from the start
    is refused before the write: the registry's features-dir-full.)"""
    real_open, written = open, []

    class Filling:  # a disk that fills up after 4 kB
        def __init__(self, f):
            self.f = f

        def write(self, data):
            written.append(len(data))
            if sum(written) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(files, "open", lambda path, mode="r", *a, **k: Filling(real_open(path, mode)) if "w" in mode
                        else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(DataError, match=rf"^no room for {re.escape(str(tmp_path))}/dtd_{VIT}.pt: it needs "
                                        rf"[0-9.]+ MiB and the disk of .* free; free some space there or choose "
                                        rf"another --features-dir$"):
        run(make_dataset("dtd"), tmp_path, tiny_vit_checkpoint)
    assert [p.name for p in tmp_path.iterdir()] == [f".dtd_{VIT}.pt.lock"]


def test_nan_features_from_a_model_with_finite_weights_are_never_written(make_dataset, tiny_vit_checkpoint,
                                                                         tmp_path, monkeypatch):
    """A computation that overflows (float16 on a GPU) gives NaN features from finite weights: refused, naming
    an image, before anything is written."""
    load = backbones.load

    def overflowing(settings, device):
        encoder = load(settings, device)
        encode = encoder.model.encode_image
        encoder.model.encode_image = lambda x: encode(x) * float("inf")
        return encoder
    monkeypatch.setattr(backbones, "load", overflowing)
    with pytest.raises(DataError, match=r"^CLIP gave NaN, infinite or zero image features for \d+ of \d+ rows, e.g. "
                                        r"for 'class a_0/.*\.jpg': the model's output is broken; nothing was written"):
        run(make_dataset("dtd"), tmp_path, tiny_vit_checkpoint)
    assert not ff.features_path(tmp_path, "dtd", VIT).exists()


def test_a_killed_write_leaves_a_temporary_file_that_the_next_write_removes(tmp_path):
    path = tmp_path / "f.pt"
    killed = multiprocessing.get_context("fork").Process(target=files.write_atomic, args=(
        path, lambda f: (f.write(b"half"), f.flush(), os.kill(os.getpid(), signal.SIGKILL))))
    killed.start()
    killed.join()
    assert killed.exitcode == -signal.SIGKILL and not path.exists()
    [left] = tmp_path.glob(".f.pt.*.tmp")
    assert left.read_bytes() == b"half"
    host = socket.gethostname()
    keep = [tmp_path / f".f.pt.{host}.{os.getppid()}.tmp",  # a live writer's (the process that ran pytest)
            tmp_path / ".f.pt.otherhost.1.tmp",              # another host's, recent: its writer may be alive
            tmp_path / f".g.pt.{host}.{left.name.split('.')[-2]}.tmp"]  # another file's
    old = tmp_path / ".f.pt.otherhost.2.tmp"                 # another host's, untouched for two days
    for p in (*keep, old):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    files.write_atomic(path, lambda f: f.write(b"whole"))
    assert path.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [path, *keep])


def test_resnet_backbone_fgvc_layout_and_prompt_file(make_dataset, tiny_resnet_checkpoint, tmp_path):
    root = make_dataset("fgvc_aircraft")
    # CuPL files spell class names their own way: underscores for spaces, other case
    sentences = {"CLASS_A_0": ["an aircraft a.", "a plane a."], "class b_1": ["b."], "class c 2": ["c!"]}
    prompts = tmp_path / "cupl.json"
    prompts.write_text(json.dumps(sentences))
    f, path = run(root, tmp_path, tiny_resnet_checkpoint, "fgvc_aircraft", prompts=prompts)
    assert path.name == f"fgvc_aircraft_{RESNET}.pt"
    assert f["prompts"]["positive"] == list(sentences.values())
    assert f["text"]["positive"].shape == (3, 32) and f["train"]["features"].shape[::2] == (3, 32)
    assert_unit(f["text"]["positive"])
    assert f["test"]["labels"].tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_imagenet_extracts_only_the_sampled_training_images(make_dataset, tiny_vit_checkpoint, tmp_path):
    root = make_dataset("imagenet", counts={"train": [12, 9, 10], "test": [3, 2, 2]})
    f, _ = run(root, tmp_path, tiny_vit_checkpoint, "imagenet", seeds=(7,), max_shots=2)
    assert f["train"]["features"].shape[1] == 3 * 2  # not the 31 training images
    assert "val" not in f and "val_fewshot" not in f
    assert f["test"]["labels"].tolist() == [0, 0, 0, 1, 1, 2, 2]  # images/val is the test set
    assert all(p.startswith("val/") for p in f["paths"]["test"])


@pytest.mark.parametrize("key, subset, class_map", [("imagenet-adversarial", [1, 3, 4], [1, 3, 4]),
                                                    ("imagenetv2", None, [0, 1, 2, 3, 4])])
def test_shift_sets_store_their_class_map(make_dataset, tiny_vit_checkpoint, tmp_path, key, subset, class_map):
    root = make_dataset(key, num_classes=5, subset=subset)
    f, _ = run(root, tmp_path, tiny_vit_checkpoint, key)
    assert f["class_map"].tolist() == class_map and f["class_map"].dtype == torch.long
    names = [n for _, n in fd._imagenet_classes(key, root / fd.DATASETS[key].folder)]
    assert f["classnames"] == [fd.prompt_name(names[i]) for i in class_map]
    assert f["text"]["positive"].shape == (len(class_map), 32)
    assert set(f["test"]["labels"].tolist()) == set(range(len(class_map)))
    assert not {"train", "fewshot", "val", "val_fewshot"} & set(f)
    # a test-only set is reused whatever the main run's few-shot flags, which mean nothing for it
    path = ff.features_path(tmp_path, key, VIT)
    stamp = path.stat().st_mtime_ns
    for other in (dict(seeds=(5,), max_shots=9, views=2), dict(allow_repeats=True)):
        run(root, tmp_path, tiny_vit_checkpoint, key, **other)
        run(root / "absent", tmp_path, tiny_vit_checkpoint, key, **other)
    assert path.stat().st_mtime_ns == stamp


def test_unreadable_images_are_all_reported_before_clip_is_loaded(make_dataset, tiny_vit_checkpoint, tmp_path,
                                                                  tripwire):
    root = make_dataset("dtd", counts={"train": [5, 5, 5], "val": [4, 4, 4]})  # with 5 shots, all are used
    images = fd.load_splits("dtd", root).images
    (images / "class a_0" / "test_1.jpg").unlink()
    (images / "class c_2" / "train_0.jpg").write_text("not a jpeg")
    (images / "class c_2" / "val_0.jpg").write_bytes(b"")
    wire = tripwire(backbones, "load", "CLIP was loaded before the images were checked")
    with pytest.raises(DataError) as e:
        run(root, tmp_path, tiny_vit_checkpoint, max_shots=5)
    message = str(e.value)
    assert message.startswith("3 of 34 images cannot be read, e.g. ") and "\n" not in message  # 15 + 12 + 7
    for name, why in (("class a_0/test_1.jpg", "missing"), ("class c_2/train_0.jpg", "not an image"),
                      ("class c_2/val_0.jpg", "not an image")):
        assert f"{images / name} ({why})" in message
    assert not ff.features_path(tmp_path, "dtd", VIT).exists()
    wire.proven(lambda: run(make_dataset("dtd"), tmp_path, tiny_vit_checkpoint))   # readable images: CLIP loads


@pytest.mark.parametrize("flag, kwargs", [
    ("--encode-batch-size", dict(batch_size=0)),
    ("--workers", dict(workers=-1)),
    ("--precision", dict(precision="fp8")),
    ("--negative-template", dict(negative_template="a photo without the class name.")),
    ("--negative-template", dict(negative_template="a {} that is no {}.")),
    ("--max-shots", dict(max_shots=0)),
    ("--views", dict(views=0)),
    ("--seeds", dict(seeds=())),
])
def test_bad_flags_are_named_before_anything_is_read(tiny_vit_checkpoint, tmp_path, flag, kwargs):
    # the dataset folder does not even exist: the flag is checked first
    with pytest.raises(DataError) as e:
        run(tmp_path / "absent", tmp_path / "out", tiny_vit_checkpoint, **kwargs)
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def _bad_torch_files(folder: Path, checkpoint: Path) -> dict:
    """name -> a file torch.load cannot read: empty, truncated, text."""
    files = {"empty": b"", "truncated": checkpoint.read_bytes()[:100_000], "text": b"model: ViT-B/32\n"}
    for name, content in files.items():
        (folder / f"{name}.pt").write_bytes(content)
    return {name: folder / f"{name}.pt" for name in files}


def test_unreadable_torch_files_get_one_line(tiny_vit_checkpoint, tmp_path):
    for name, path in _bad_torch_files(tmp_path, tiny_vit_checkpoint).items():
        with pytest.raises(DataError) as e:
            backbones.resolve(ff.Settings("dtd", clip_checkpoint=str(path)))
        assert str(e.value).startswith(f"--clip-checkpoint {path} is truncated or not a file written by "
                                       f"torch.save"), name
        assert "\n" not in str(e.value)
        with pytest.raises(DataError, match="^checkpoint .* is truncated or not a file written by torch.save"):
            files.load_torch_file(path, "checkpoint")
    with pytest.raises(DataError, match="^features file .*absent.pt does not exist$"):
        files.load_torch_file(tmp_path / "absent.pt", "features file")
    torch.save({"a": torch.zeros(2)}, tmp_path / "not_clip.pt")   # a torch file, not a CLIP
    with pytest.raises(DataError, match="^--clip-checkpoint .* is a torch file but not an OpenAI CLIP checkpoint"):
        backbones.resolve(ff.Settings("dtd", clip_checkpoint=str(tmp_path / "not_clip.pt")))
    torch.save({"a": Path("x")}, tmp_path / "objects.pt")         # torch.save'd, but not weights only
    with pytest.raises(DataError, match="objects other than tensors"):
        files.load_torch_file(tmp_path / "objects.pt", "checkpoint")
    assert files.load_torch_file(tmp_path / "not_clip.pt", "checkpoint", mmap=True)["a"].shape == (2,)


def test_allow_repeats_uses_every_image_before_repeating(make_dataset, tiny_vit_checkpoint, tmp_path):
    f, _ = run(make_dataset("dtd", counts={"train": [5, 2, 6]}), tmp_path, tiny_vit_checkpoint, allow_repeats=True)
    for rows in f["fewshot"].values():
        small = rows[1].tolist()
        assert len(set(small[:2])) == 2 and small[2:] == small[:2]


def test_path_flags_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = {}
    monkeypatch.setattr(ef.Extraction, "extract", lambda self, *args: seen.update(extraction=self))
    commands.extract_command(["--dataset", "dtd", "--root=~/data", "--features-dir", "~/features",
                              "--clip-checkpoint=~/clip.pt", "--prompts", "~/cupl.json"])
    extraction = seen["extraction"]
    assert (extraction.root, extraction.features_dir) == (tmp_path / "data", tmp_path / "features")
    assert (extraction.settings.clip_checkpoint, extraction.settings.prompts) == (str(tmp_path / "clip.pt"),
                                                                                str(tmp_path / "cupl.json"))
    commands.extract_command(["--dataset", "dtd", "--prompts", "cupl"])  # not a path: CuPL's descriptions
    assert seen["extraction"].settings.prompts == "cupl"


@pytest.fixture
def cupl_dtd(tmp_path, monkeypatch):
    """A CuPL file for dtd served from a file:// URL in place of the pinned one, and an empty cache folder."""
    source = tmp_path / "CuPL_prompts_dtd.json"
    # spelt CuPL's way (case, spaces for underscores); "class c_2" has no sentences
    source.write_text(json.dumps({"Class A 0": ["a woven texture.", "threads."], "class_b_1": ["spots."]}))
    # patched in extract_features, where cupl_prompts looks the table up (fewshot_data.py defines it)
    monkeypatch.setattr(prompts, "CUPL_PROMPTS",
                        {"dtd": (source.as_uri(), hashlib.sha256(source.read_bytes()).hexdigest())})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return source


def test_cupl_prompts_are_downloaded_checked_cached_and_recorded(cli, cupl_dtd, tiny_vit_checkpoint, tmp_path,
                                                                  capsys):
    root = cli[0]
    capsys.readouterr()
    f, _ = run(root, tmp_path / "out", tiny_vit_checkpoint, prompts="cupl")
    out, err = capsys.readouterr()
    assert "downloading the CuPL prompts of dtd" in out
    assert f["prompts"]["positive"] == [["a woven texture.", "threads."], ["spots."], ["class c 2 texture."]]
    assert err.count("warning") == 1 and "no sentences for 1 of 3 classes" in err  # the fallback is said once
    cached = tmp_path / "cache" / "hegraphadapter" / "CuPL_prompts_dtd.json"
    assert cached.read_bytes() == cupl_dtd.read_bytes()
    # recorded apart from the templates, which the cli run used
    assert f["settings"]["prompts"] == "cupl" and cli[3]["settings"]["prompts"] == "templates"
    assert f["settings"]["prompts_sha256"] != cli[3]["settings"]["prompts_sha256"]
    cupl_dtd.unlink()                          # a second use reads the cache: no download
    assert download.cupl_prompts("dtd") == cached and "downloading" not in capsys.readouterr().out
    cached.write_text("{}")                    # a cache that no longer matches its sha256 is not used
    with pytest.raises(DataError, match="^--prompts cupl: cannot download file:"):
        download.cupl_prompts("dtd")


def test_a_cupl_download_with_another_sha256_is_refused_and_not_kept(cupl_dtd, tmp_path, monkeypatch):
    monkeypatch.setitem(prompts.CUPL_PROMPTS, "dtd", (cupl_dtd.as_uri(), "0" * 64))
    with pytest.raises(DataError, match=f"^--prompts cupl: {cupl_dtd.as_uri()} has sha256 [0-9a-f]{{64}}, not the "
                                           f"pinned 0{{64}} .*nothing was cached or used$"):
        download.cupl_prompts("dtd")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match="^--prompts cupl: no CuPL descriptions are pinned for 'imagenet-sketch'"):
        download.cupl_prompts("imagenet-sketch")


def test_cupl_table_pins_a_commit_and_a_sha256_per_dataset():
    for dataset, (url, sha256) in prompts.CUPL_PROMPTS.items():
        assert dataset in fd.DATASETS and re.fullmatch(r"[0-9a-f]{64}", sha256)
        assert re.fullmatch(r"https://raw\.githubusercontent\.com/[\w-]+/[\w-]+/[0-9a-f]{40}/.+\.json", url)
    assert len({url for url, _ in prompts.CUPL_PROMPTS.values()}) == len(prompts.CUPL_PROMPTS)


def test_a_prompts_file_of_another_dataset_is_refused(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"abyssinian": ["a cat."]}))
    with pytest.raises(DataError, match="sentences for none of the 2 classes"):
        prompts.load_prompts(tmp_path / "p.json", ["banded", "blotchy"], "{} texture.")
    (tmp_path / "p.json").write_text(json.dumps({"banded": "stripes."}))  # a string, not a list of sentences
    with pytest.raises(DataError, match="is not a json object"):
        prompts.load_prompts(tmp_path / "p.json", ["banded", "blotchy"], "{} texture.")


def test_help_lists_every_extraction_flag(capsys):
    """(A bad command line's one error line: the bad-input registry.)"""
    with pytest.raises(SystemExit) as e:
        commands.extract_command(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--backbone", "--pretrained", "--clip-checkpoint", "--prompts", "--negative-template", "--seeds",
                   "--max-shots", "--views", "--precision", "--encode-batch-size", "--workers", "--device",
                   "--allow-repeats", "--overwrite"):
        assert option in text


def test_an_image_listed_twice_counts_once(make_dataset, tiny_vit_checkpoint, tmp_path):
    """Class a has 5 training images: listing one of them again does not make 6, so --max-shots 6 still needs
    --allow-repeats."""
    root = make_dataset("dtd")
    path = root / "dtd" / fd.DATASETS["dtd"].split
    split = json.loads(path.read_text())
    split["train"].append(list(split["train"][0]))
    path.write_text(json.dumps(split))
    assert len(fd.load_splits("dtd", root).train) == 5 + 6 + 7
    with pytest.raises(DataError, match="class 0 .* has 5 training images, fewer than the 6 needed"):
        run(root, tmp_path, tiny_vit_checkpoint, max_shots=6)
