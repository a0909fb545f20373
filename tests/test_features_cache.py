"""The features file as a cache that grows (fewshot/cache.py): a prompt change encodes no image, a new seed, a
larger max-shots or more views encode only what the file lacks, and the file grown equals a fresh extraction with
the final settings; what changed (an image's content, a checkpoint replaced, a folder elsewhere) is said and
redone exactly; what the run asks for and the file cannot hold is refused, and the flag the line suggests runs.
On tiny random CLIPs and generated datasets (CPU)."""
import json
import shutil

import pytest
import torch

import fewshot.extraction as ef
import fewshot.features as ff
from fewshot import cli, runs
from fewshot.errors import DataError
from fewshot.tasks import make_task
from fewshot.testing.fixtures import (
    TINY_CLIPS,
    TINY_NAMES,
    openai_state_dict,
    redraw_image,
    same_features,
    write_image,
    write_image_folder,
)

VIT = TINY_NAMES["vit"]
COUNTS = {"train": [12, 13, 14], "val": [5, 5, 5], "test": [3, 3, 3]}   # enough images for seeds to differ
# fp32: a grown file equals a fresh extraction tensor for tensor; at bf16 an image's features depend a little on the
# batch it was encoded in, so there it holds to pace.MATCH (test_encoding.py)
BASE = dict(seeds=(1, 2, 3), max_shots=4, views=2, precision="fp32")


@pytest.fixture
def data(make_dataset):
    return make_dataset("dtd", counts=COUNTS)


def extract(root, out, checkpoint, dataset="dtd", overwrite=False, **settings):
    """extract() with the tiny settings: the Extracted record."""
    return ef.extract(ff.Settings(dataset, clip_checkpoint=str(checkpoint), **{**BASE, **settings}), root, out,
                      workers=0, device="cpu", overwrite=overwrite)


def load(path):
    return torch.load(path, weights_only=True)


def differences(a, b, where=""):
    """Where two features files differ: tensors by same_features, everything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and same_features(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where} keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def fresh(root, tmp_path, checkpoint, **settings):
    """A fresh extraction with these settings, in a folder of its own: its loaded dict."""
    return load(extract(root, tmp_path / "fresh", checkpoint, **settings).path)


def test_a_prompt_change_encodes_no_image_and_keeps_every_prompt_set(data, tiny_vit_checkpoint, tmp_path,
                                                                    monkeypatch):
    first = extract(data, tmp_path, tiny_vit_checkpoint)
    before = load(first.path)
    encoded = []
    real = ef.encode_images
    monkeypatch.setattr(ef, "encode_images", lambda model, files, *a: encoded.append(len(files)) or real(model, files,
                                                                                                         *a))
    second = extract(data, tmp_path, tiny_vit_checkpoint, template="a close-up of {}.")
    assert (second.images, second.views_encoded, second.texts, encoded) == (0, 0, 1, [])   # the text encoder only
    after = load(second.path)
    assert set(after["texts"]) == {first.text, second.text} and first.text != second.text
    assert differences({k: after[k] for k in ("train", "val", "test", "fewshot", "val_fewshot", "paths")},
                       {k: before[k] for k in ("train", "val", "test", "fewshot", "val_fewshot", "paths")}) == []
    # each run reads its own set; the file is a fresh extraction with the new template, plus the first set
    mine = ff.load_features(second.path, text=second.text)
    assert mine["prompts"]["positive"][0] == ["a close-up of class a 0."]
    assert mine["text_set"]["template"] == "a close-up of {}." and mine["text_set"]["sha256"] == second.text
    assert ff.load_features(second.path, text=first.text)["prompts"]["positive"][0] == ["class a 0 texture."]
    assert torch.equal(ff.load_features(second.path, text=first.text)["text"]["positive"],
                       before["text"]["positive"])
    other = fresh(data, tmp_path, tiny_vit_checkpoint, template="a close-up of {}.")
    assert differences({**after, "texts": None}, {**other, "texts": None}) == []
    # the same prompts again: reused as it is
    stamp = second.path.stat().st_mtime_ns
    assert extract(data, tmp_path, tiny_vit_checkpoint, template="a close-up of {}.").images == 0
    assert second.path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("more", [dict(seeds=(1, 2, 3, 4)), dict(max_shots=8), dict(views=4),
                                  dict(seeds=(4,), max_shots=6)])
def test_asking_for_more_encodes_only_what_the_file_lacks_and_equals_a_fresh_extraction(
        data, tiny_vit_checkpoint, tmp_path, more, capsys):
    first = extract(data, tmp_path, tiny_vit_checkpoint)
    before = load(first.path)
    capsys.readouterr()
    grown = extract(data, tmp_path, tiny_vit_checkpoint, **more)
    assert "grows from seeds [1, 2, 3], max-shots 4, views 2" in capsys.readouterr().out
    after = load(grown.path)
    final = dict(seeds=tuple(dict.fromkeys([*BASE["seeds"], *more.get("seeds", ())])),
                 max_shots=max(BASE["max_shots"], more.get("max_shots", 0)), views=max(2, more.get("views", 0)))
    assert differences(after, fresh(data, tmp_path, tiny_vit_checkpoint, **final)) == []
    # what was encoded: the images the file lacked, whole, and the views the images it held lacked
    had = {p for split in before["paths"].values() for p in split}
    new = [p for split in after["paths"].values() for p in split if p not in had]
    lacking, kept_train = final["views"] - 2, [p for p in after["paths"]["train"] if p in had]
    new_train = [p for p in after["paths"]["train"] if p not in had]
    assert grown.images == len(new) + (len(kept_train) if lacking else 0) > 0
    assert grown.views_encoded == len(new_train) * final["views"] + (len(new) - len(new_train)) + \
        lacking * len(kept_train)
    assert grown.texts == 0


def test_a_run_asking_for_less_reads_what_a_fresh_extraction_would_give_it(data, tiny_vit_checkpoint, tmp_path):
    big = extract(data, tmp_path, tiny_vit_checkpoint, seeds=(1, 2, 3), max_shots=6, views=3)
    stamp = big.path.stat().st_mtime_ns
    small = dict(seeds=(2,), max_shots=3, views=2)
    served = extract(data, tmp_path, tiny_vit_checkpoint, **small)
    assert served.path == big.path and big.path.stat().st_mtime_ns == stamp and served.images == 0
    mine = ff.load_features(served.path, views=served.views, text=served.text)
    alone = ff.load_features(extract(data, tmp_path / "alone", tiny_vit_checkpoint, **small).path)
    for shots in (1, 3):
        a, b = (make_task(d, 2, shots, "cpu") for d in (mine, alone))
        for name in ("train_views", "train_labels", "cache_feats", "pos_text", "neg_text"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert all(torch.equal(x, y) for x, y in zip(a.val + a.test, b.val + b.test))


def test_an_image_changed_under_its_name_is_said_and_encoded_again(data, tiny_vit_checkpoint, tmp_path, capsys):
    first = extract(data, tmp_path, tiny_vit_checkpoint)
    made = load(first.path)
    images = data / "dtd" / "images"
    changed = [made["paths"]["train"][3], made["paths"]["test"][1]]
    for i, rel in enumerate(changed):
        redraw_image(images / rel, 1000 + 100 * i)               # its size and mtime kept: the ctime tells
    capsys.readouterr()
    again = extract(data, tmp_path, tiny_vit_checkpoint)
    out = capsys.readouterr().out
    assert "2 images changed content since they were encoded" in out and changed[0] in out
    assert (again.images, again.views_encoded) == (2, 2 + 1)
    after = load(again.path)
    assert differences(after, fresh(data, tmp_path, tiny_vit_checkpoint)) == []
    row = made["paths"]["train"].index(changed[0])
    assert not torch.equal(after["train"]["features"][:, row], made["train"]["features"][:, row])


def other_weights(path):
    """A checkpoint at `path` of the same architecture as the tiny ViT, with other weights."""
    state = openai_state_dict(TINY_CLIPS["vit"])
    for key in ("visual.proj", "text_projection"):     # other image and text features alike
        state[key] = -state[key]
    torch.save(state, path)
    return path


def test_a_checkpoint_replaced_at_its_path_is_said_and_everything_encoded_again(data, tiny_vit_checkpoint, tmp_path,
                                                                                capsys):
    checkpoint = tmp_path / "clip.pt"
    shutil.copy(tiny_vit_checkpoint, checkpoint)
    first = extract(data, tmp_path / "features", checkpoint, template="a close-up of {}.")
    extract(data, tmp_path / "features", checkpoint)                       # a second prompt set
    held = load(first.path)
    other_weights(checkpoint)
    capsys.readouterr()
    again = extract(data, tmp_path / "features", checkpoint)
    assert f"the weights at {checkpoint} changed since the features were made" in capsys.readouterr().out
    assert again.images == sum(len(p) for p in held["paths"].values()) and again.texts == 2
    after = load(again.path)
    assert differences({**after, "texts": None}, {**fresh(data, tmp_path, checkpoint), "texts": None}) == []
    text = lambda f: f["texts"][first.text]["text"]["positive"]
    assert not torch.equal(text(after), text(held))


def test_other_weights_are_refused_with_the_difference_and_the_same_weights_copied_are_reused(
        data, tiny_vit_checkpoint, tmp_path, capsys):
    first = extract(data, tmp_path / "features", tiny_vit_checkpoint)
    stamp = first.path.stat().st_mtime_ns
    copy = tmp_path / "copy.pt"
    shutil.copy(tiny_vit_checkpoint, copy)                                 # the same weights elsewhere: the same
    assert extract(data, tmp_path / "features", copy).images == 0 and first.path.stat().st_mtime_ns == stamp
    other = other_weights(tmp_path / "other.pt")
    with pytest.raises(DataError) as e:
        extract(data, tmp_path / "features", other)
    assert f"holds the features of other weights than this run asks for ({tiny_vit_checkpoint} (sha256 " in str(e.value)
    assert f"in the file, {other} (sha256 " in str(e.value) and "pass --overwrite" in str(e.value)
    assert first.path.stat().st_mtime_ns == stamp
    # the flag the line names runs: --overwrite extracts afresh with the weights asked for
    argv = ["--dataset", "dtd", "--root", str(data), "--features-dir", str(tmp_path / "features"),
            "--clip-checkpoint", str(other), "--seeds", "1", "2", "3", "--max-shots", "4", "--views", "2",
            "--precision", "fp32", "--workers", "0", "--device", "cpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as failed:
        cli.extract_command(argv)
    assert failed.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    cli.extract_command([*argv, "--overwrite"])
    assert load(first.path)["identity"]["model"]["at"] == str(other)
    assert differences(load(first.path), fresh(data, tmp_path, other)) == []


def test_a_folder_of_the_same_name_elsewhere_is_compared_by_content(tiny_vit_checkpoint, tmp_path, capsys):
    a = write_image_folder(tmp_path / "a" / "my_images", {"red_panda": 18, "snow-leopard": 18})
    first = extract(None, tmp_path / "features", tiny_vit_checkpoint, str(a))
    b = tmp_path / "b" / "my_images"
    shutil.copytree(a, b)                                                   # a copy: the same content
    capsys.readouterr()
    same = extract(None, tmp_path / "features", tiny_vit_checkpoint, str(b))
    assert same.path == first.path and same.images == 0
    made = load(first.path)
    assert made["identity"]["source"]["images"] == str(b)                  # its dates and place recorded anew
    write_image(b / made["paths"]["test"][0], 77)                           # then another picture at one name
    capsys.readouterr()
    c = tmp_path / "c" / "my_images"
    shutil.copytree(b, c)
    again = extract(None, tmp_path / "features", tiny_vit_checkpoint, str(c))
    out = capsys.readouterr().out
    assert f"its images were read from {b}, this run's from {c}: they are compared by content" in out
    assert "1 image changed content since it was encoded" in out and again.images == 1
    assert differences(load(again.path), fresh(None, tmp_path, tiny_vit_checkpoint, dataset=str(c))) == []


def test_another_dataset_of_the_same_name_is_refused_and_its_own_folder_works(data, tiny_vit_checkpoint, tmp_path):
    extract(data, tmp_path / "features", tiny_vit_checkpoint)
    mine = write_image_folder(tmp_path / "dtd", {"red_panda": 18, "snow-leopard": 18})   # a folder named dtd
    with pytest.raises(DataError) as e:
        extract(data, tmp_path / "features", tiny_vit_checkpoint, str(mine))
    assert f"holds the features of the benchmark dtd, and this run's --dataset is the folder {mine}" in str(e.value)
    assert "choose another --features-dir" in str(e.value) and "--overwrite" not in str(e.value)
    assert extract(data, tmp_path / "mine", tiny_vit_checkpoint, str(mine)).images > 0   # what the line says runs


def test_an_old_format_file_is_read_for_training_and_refused_for_growing(data, tiny_vit_checkpoint, tmp_path, run,
                                                                        fail):
    path = extract(data, tmp_path / "features", tiny_vit_checkpoint).path
    old = load(path)
    v1 = {k: v for k, v in old.items() if k not in ("texts", "content", "identity")} | {"format": ff.OLD_FORMAT}
    torch.save(v1, path)
    common = ["--dataset", "dtd", "--root", data, "--features-dir", tmp_path / "features", "--clip-checkpoint",
              tiny_vit_checkpoint, "--seeds", 1, "--max-shots", 4, "--views", 2, "--workers", 0, "--device", "cpu",
              "--shots", 2, "--epochs", 1]
    line = fail(*common)
    assert "was written by an older version of extract_features.py (hegraphadapter-features-v1)" in line
    assert "pass --overwrite" in line and "--features-dir" in line
    assert run("--features", path, "--shots", 2, "--epochs", 1, "--seeds", 1, "--device", "cpu")["test_accuracy"] >= 0
    assert run(*common, "--overwrite")["test_accuracy"] >= 0                # what the line says runs
    assert load(path)["format"] == ff.FORMAT


def test_train_py_records_the_prompt_set_it_used(run, data, tiny_vit_checkpoint, tmp_path):
    common = ["--dataset", "dtd", "--root", data, "--clip-checkpoint", tiny_vit_checkpoint, "--seeds", 1,
              "--max-shots", 2, "--views", 1, "--workers", 0, "--device", "cpu", "--shots", 2, "--method", "zeroshot"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"class a_0": ["woven threads."]}))
    plain, mine = run(*common), run(*common, "--prompts", prompts)
    assert plain["prompts"]["prompts"] == "templates" and plain["prompts"]["template"] == "{} texture."
    assert mine["prompts"]["prompts"] == "prompts.json" and mine["prompts"]["sha256"] != plain["prompts"]["sha256"]
    data_ = load(tmp_path / "features" / f"dtd_{VIT}.pt")
    assert set(data_["texts"]) == {plain["prompts"]["sha256"], mine["prompts"]["sha256"]}
    again = run(*common)
    assert again["seeds"] == plain["seeds"]                                  # the first set again: its numbers
    assert again["features_identity"] == plain["features_identity"] == mine["features_identity"]  # same images


def test_the_suggested_flags_of_a_features_file_run(feats, run, fail):
    """--features FILE lacking a seed or a K: the line says what to run instead, and that runs."""
    assert "run with those --seeds" in fail("--features", feats, "--seeds", 9, "--shots", 2, "--device", "cpu")
    assert run("--features", feats, "--seeds", 1, 2, 3, "--shots", 2, "--epochs", 1, "--device", "cpu")
    line = fail("--features", feats, "--shots", 8, "--seeds", 1, "--device", "cpu")
    assert "run with --shots 4 or fewer" in line
    assert run("--features", feats, "--shots", 4, "--seeds", 1, "--epochs", 1, "--device", "cpu")


def test_runs_read_the_views_they_ask_for(data, tiny_vit_checkpoint, tmp_path):
    extraction = ef.Extraction(ff.Settings("", clip_checkpoint=str(tiny_vit_checkpoint), max_shots=2, views=3),
                               data, tmp_path / "features", workers=0)
    assert extraction.features("dtd", (1,), "cpu")["train"]["features"].shape[0] == 3
    fewer = ef.Extraction(ff.Settings("", clip_checkpoint=str(tiny_vit_checkpoint), max_shots=2, views=1),
                          data, tmp_path / "features", workers=0)
    assert fewer.features("dtd", (1,), "cpu")["train"]["features"].shape[0] == 1
    request = runs.RunRequest(dataset="dtd", extraction=fewer, method="zeroshot", shots=2, seeds=(1,), device="cpu")
    assert runs.run(request)["test_accuracy"] >= 0


def test_a_class_renamed_in_a_folder_is_said_and_its_images_and_prompts_encoded_again(tiny_vit_checkpoint, tmp_path,
                                                                                        capsys):
    folder = write_image_folder(tmp_path / "mine", {"red_panda": 8, "snow-leopard": 8})
    first = extract(None, tmp_path / "features", tiny_vit_checkpoint, str(folder), max_shots=2)
    kept = len([p for split in load(first.path)["paths"].values() for p in split if p.startswith("red_panda/")])
    (folder / "snow-leopard").rename(folder / "snow_owl")               # another class: its paths change too
    capsys.readouterr()
    again = extract(None, tmp_path / "features", tiny_vit_checkpoint, str(folder), max_shots=2)
    out = capsys.readouterr().out
    assert "the class names changed: the file's prompt sets are left out" in out and again.texts == 1
    after = load(again.path)
    assert again.images == sum(len(p) for p in after["paths"].values()) - kept and list(after["texts"]) == [again.text]
    assert differences(after, fresh(None, tmp_path, tiny_vit_checkpoint, dataset=str(folder), max_shots=2)) == []
