"""--dataset PATH: a folder of class subfolders (ImageFolder's layout), its classes, its split and its checks;
and --template. End to end through train.py's command line on generated images. (A folder that cannot be read
as a dataset, links that alias or leave a class, names that are not UTF-8: cases of the bad-input registry.)"""
import hashlib
import json
import os
import re
import shlex
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch

import fewshot.datasets as fd
from fewshot.errors import DataError
from fewshot.testing.fixtures import TINY_NAMES, write_image_folder

TINY = ["--device", "cpu", "--workers", "0"]
VIT = TINY_NAMES["vit"]  # the name of the tiny ViT checkpoint, read from its weights


def touch(folder: Path, *names):
    """Empty files: enough for reading a folder's layout and split (nothing is decoded)."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def class_files(n, prefix="img"):
    return [f"{prefix}{i}.jpg" for i in range(n)]


def test_a_key_wins_a_path_is_a_folder_and_an_unknown_name_lists_the_keys(tmp_path):
    (tmp_path / "dtd").mkdir()                          # a folder named like a key, in the working folder
    (tmp_path / "widgets").mkdir()
    assert fd.resolve_dataset("dtd") == "dtd"
    assert fd.resolve_dataset("./dtd") == str(tmp_path / "dtd")
    assert fd.resolve_dataset("widgets") == str(tmp_path / "widgets")   # no key: an existing folder
    assert fd.dataset_name(fd.resolve_dataset("./dtd")) == "dtd" and fd.is_folder(fd.resolve_dataset("./dtd"))
    with pytest.raises(DataError, match=r"^unknown dataset 'gadgets'; choose one of: imagenet, caltech101, .*"
                                           r"or give a folder of class subfolders, e.g. \./gadgets$"):
        fd.resolve_dataset("gadgets")
    with pytest.raises(DataError, match="^--dataset no/such: no such folder; give a folder holding one"):
        fd.resolve_dataset("no/such")
    touch(tmp_path, "file.txt")
    with pytest.raises(DataError, match="^--dataset ./file.txt: not a folder"):
        fd.resolve_dataset("./file.txt")


def test_classes_are_the_sorted_folder_names_and_odd_entries_follow_rules(tmp_path, capsys):
    folder = tmp_path / "mine"
    touch(folder, *[f"snow-leopard/{f}" for f in class_files(4)],
          *[f"red_panda/{f}" for f in class_files(3)],
          "red_panda/deeper/still/img9.JPG",            # nested folders: their images count, any case of suffix
          "red_panda/notes.txt", "red_panda/.DS_Store", "red_panda/._img0.jpg",  # not images, hidden
          ".git/a.jpg", "__MACOSX/red_panda/._img1.jpg", "README.md", "split_notes.json")  # no classes
    os.symlink(folder / "red_panda", folder / "red_panda" / "deeper" / "loop")    # a link up the tree
    outside = tmp_path / "elsewhere" / "Tabby_Cat"
    touch(outside, *class_files(3))
    os.symlink(outside, folder / "tabby_cat")           # a linked class folder is followed
    splits = fd.load_splits(str(folder), root="unused")
    assert splits.classnames == ["red panda", "snow leopard", "tabby cat"]  # red_panda < snow-leopard < tabby_cat
    paths = {s: [p for p, _ in getattr(splits, s)] for s in ("train", "val", "test")}
    every = sorted(p for ps in paths.values() for p in ps)
    assert every == sorted([f"red_panda/{f}" for f in class_files(3)] + ["red_panda/deeper/still/img9.JPG"]
                           + [f"snow-leopard/{f}" for f in class_files(4)] + [f"tabby_cat/{f}" for f in class_files(3)])
    err = capsys.readouterr().err.strip().split("\n")          # the loop is said once, and not followed
    assert splits.images == folder and len(err) == 1 and "1 links in" in err[0] and "deeper/loop ->" in err[0]


def test_the_split_is_50_20_30_per_class_by_file_name_alone(tmp_path):
    names = class_files(10)
    a, b = tmp_path / "a", tmp_path / "b"
    touch(a, *[f"x/{f}" for f in names], *[f"y/{f}" for f in class_files(3)], *[f"z/{f}" for f in class_files(4)])
    touch(b, *[f"x/{f}" for f in reversed(names)], *[f"y/{f}" for f in class_files(3)],
          *[f"z/{f}" for f in class_files(4)])           # created in another order
    sa, sb = fd.load_splits(str(a), None), fd.load_splits(str(b), None)
    assert sa.coop_split() == sb.coop_split() and sa.sha256() == sb.sha256()
    count = lambda s, y: sum(label == y for _, label in getattr(sa, s))
    assert [[count(s, y) for s in ("train", "val", "test")] for y in range(3)] == [[5, 2, 3], [1, 1, 1], [2, 1, 1]]
    # the order is the sha256 of the path within the class: val first, then test, then train
    order = sorted(names, key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    assert [p for p, y in sa.val if y == 0] == sorted(f"x/{f}" for f in order[:2])
    assert [p for p, y in sa.test if y == 0] == sorted(f"x/{f}" for f in order[2:5])
    # one more image moves few others: every image of the 10 keeps its split but at most 2
    touch(a, "x/img10.jpg")
    where = lambda s: {p: k for k in ("train", "val", "test") for p, y in getattr(s, k) if y == 0}
    before, after = where(sa), where(fd.load_splits(str(a), None))
    assert sum(before[p] != after[p] for p in before) <= 2


def test_names_are_taken_in_unicodes_composed_form(tmp_path):
    decomposed = unicodedata.normalize("NFD", "café_crème")
    touch(tmp_path / "mine", *[f"{decomposed}/{f}" for f in class_files(3)], *[f"thé/{f}" for f in class_files(3)])
    splits = fd.load_splits(str(tmp_path / "mine"), None)
    assert splits.classnames == ["café crème", "thé"]
    assert all(unicodedata.is_normalized("NFC", c) for c in splits.classnames)


def test_loose_images_beside_class_folders_are_left_out_with_one_warning(tmp_path, capsys):
    touch(tmp_path / "mine", *[f"a/{f}" for f in class_files(3)], "stray.jpg", "stray.png")
    splits = fd.load_splits(str(tmp_path / "mine"), None)
    assert len(splits.train + splits.val + splits.test) == 3
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and err[0].startswith("warning: 2 images directly in") and "left out" in err[0]


def test_a_split_json_in_the_folder_is_used_instead(tmp_path):
    touch(tmp_path / "mine", *[f"a/{f}" for f in class_files(3)], *[f"b/{f}" for f in class_files(3)])
    split = {"train": [["a/img0.jpg", 0, "A"], ["b/img0.jpg", 1, "B"]], "val": [["a/img1.jpg", 0, "A"]],
             "test": [["b/img2.jpg", 1, "B"]]}
    (tmp_path / "mine" / "split.json").write_text(json.dumps(split))
    splits = fd.load_splits(str(tmp_path / "mine"), None)
    assert splits.classnames == ["A", "B"] and splits.coop_split() == split
    (tmp_path / "mine" / "split.json").write_text('{"train": [["a/img0.jpg", 0.0, "A"]]}')  # its checks hold too
    with pytest.raises(DataError, match="split.json has 1 labels that are not integers"):
        fd.load_splits(str(tmp_path / "mine"), None)


@pytest.fixture
def my_images(tmp_path):
    """3 classes of generated images, enough for 16 training images each (the default --max-shots)."""
    return write_image_folder(tmp_path / "my_images", {"red_panda": 32, "snow-leopard": 33, "Tabby_cat": 34})


def test_train_py_runs_on_a_folder_of_images_end_to_end(run, my_images, tiny_vit_checkpoint, tmp_path, capsys):
    """The issue's command, `train.py --dataset path/to/my_images --shots 4`, with a tiny CLIP on the CPU."""
    results = run("--dataset", my_images, "--shots", 4, "--clip-checkpoint", tiny_vit_checkpoint, *TINY,
                  "--epochs", 2)
    assert results["dataset"] == "my_images" and len(results["seeds"]) == 3
    path = tmp_path / "features" / f"my_images_{VIT}.pt"                 # named after the folder
    data = torch.load(path, weights_only=True)
    assert data["classnames"] == ["Tabby cat", "red panda", "snow leopard"]   # sorted: uppercase first
    assert data["prompts"]["positive"] == [["a photo of a Tabby cat."], ["a photo of a red panda."],
                                           ["a photo of a snow leopard."]]
    splits = fd.load_splits(str(my_images), None)
    assert data["split"] == splits.coop_split()                        # the split is recorded, as CoOp writes one
    assert data["settings"]["dataset"] == "my_images" and data["settings"]["split_sha256"] == splits.sha256()
    assert [len(getattr(splits, s)) for s in ("train", "val", "test")] == [16 + 16 + 17, 6 + 7 + 7, 10 + 10 + 10]
    assert set(data["paths"]["test"]) == {p for p, _ in splits.test}
    assert data["settings"]["max_shots"] == 4                          # the run's K: what a folder's run asks for
    # the same command reuses the file; a folder whose images changed is another split: said, and only the images
    # the file lacks are encoded (the few that moved between splits or into a subset)
    capsys.readouterr()
    run("--dataset", my_images, "--shots", 4, "--clip-checkpoint", tiny_vit_checkpoint, *TINY, "--epochs", 0)
    assert "reusing" in capsys.readouterr().out
    shutil.copy(my_images / "red_panda" / "0.jpg", my_images / "red_panda" / "new.jpg")
    run("--dataset", my_images, "--shots", 4, "--clip-checkpoint", tiny_vit_checkpoint, *TINY, "--epochs", 0)
    out = capsys.readouterr().out
    assert "the folder's split changed (1 images added, 0 removed)" in out
    encoded = int(re.search(r"^encoding (\d+) images? ", out, re.M)[1])
    assert 0 < encoded < len(data["paths"]["test"]) + len(data["paths"]["val"])
    data = torch.load(path, weights_only=True)
    assert data["split"] == fd.load_splits(str(my_images), None).coop_split()


def test_template_sets_the_positive_prompts_and_another_adds_a_prompt_set(run, my_images, tiny_vit_checkpoint,
                                                                          tmp_path, capsys):
    common = ["--dataset", my_images, "--shots", 1, "--max-shots", 1, "--seeds", 1, "--views", 1, "--epochs", 0,
              "--clip-checkpoint", tiny_vit_checkpoint, *TINY]
    bird = run(*common, "--template", "a photo of a {}, a type of bird.")
    data = torch.load(tmp_path / "features" / f"my_images_{VIT}.pt", weights_only=True)
    assert data["prompts"]["positive"][1] == ["a photo of a red panda, a type of bird."]
    assert data["settings"]["template"] == "a photo of a {}, a type of bird."
    capsys.readouterr()
    plain = run(*common)
    assert "adds the prompt set of the template 'a photo of a {}.'" in capsys.readouterr().out
    assert plain["prompts"]["template"] == "a photo of a {}." and bird["prompts"]["template"].endswith("bird.")
    assert len(torch.load(tmp_path / "features" / f"my_images_{VIT}.pt", weights_only=True)["texts"]) == 2


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_readme_states_how_many_images_a_class_needs_for_k_shots():
    """The README's table is the least n whose 50 / 20 / 30 % split gives K training and min(K, 4) validation images."""
    section = README[README.index("## Your own images"):README.index("## Methods")]
    shots = [int(k) for k in re.search(r"^\| `--shots` \|(.*)\|$", section, re.M)[1].split("|")]
    cells = re.search(r"^\| images a class needs \(train / val / test\) \|(.*)\|$", section, re.M)[1].split("|")
    for k, cell in zip(shots, cells, strict=True):
        n = next(n for n in range(3, 1000) if (lambda t, v, _: len(t) >= k and len(v) >= min(k, fd.VAL_SHOTS))(
            *fd._split_class([f"{i}.jpg" for i in range(n)])))
        parts = [len(p) for p in fd._split_class([f"{i}.jpg" for i in range(n)])]
        assert cell.strip() == f"{n} ({' / '.join(map(str, parts))})", (k, cell)


def test_the_readmes_own_images_command_runs_on_18_images_a_class(run, tiny_vit_checkpoint, tmp_path):
    """`python train.py --dataset path/to/my_images --shots 4 ...` as the README writes it, on a folder with 18 images
    a class (the least for 4 shots), with a tiny CLIP on the CPU."""
    command = re.search(r"## Your own images\n\n```bash\npython train\.py (.*)\n```", README)[1]
    folder = write_image_folder(tmp_path / "path" / "to" / "my_images", {"red_panda": 18, "snow-leopard": 18})
    argv = [a.replace("path/to/my_images", str(folder)) for a in shlex.split(command)]
    results = run(*argv, "--clip-checkpoint", tiny_vit_checkpoint, *TINY, "--epochs", 1)
    assert results["dataset"] == "my_images" and len(results["seeds"]) == 3 and results["shots"] == 4
    assert results["prompts"]["template"] == "a photo of a {}, a type of bird."


def test_a_short_classs_line_names_flags_that_run(fail, run, tmp_path, tiny_vit_checkpoint):
    """A class with fewer training images than --shots: the line names --shots (the folder's --max-shots follows
    it) or --max-shots when given, and what it suggests runs. (The folder's other bad inputs: the registry.)"""
    few = write_image_folder(tmp_path / "few", {"a": 3, "b": 20})      # 1 training image: below --shots 4
    assert fail("--dataset", few, "--shots", 4, "--clip-checkpoint", tiny_vit_checkpoint, *TINY) == (
        "error: class 0 ('a') has 1 training images, fewer than the 4 needed; lower --shots or pass "
        "--allow-repeats to reuse its images")
    assert fail("--dataset", few, "--shots", 4, "--max-shots", 4, "--clip-checkpoint", tiny_vit_checkpoint,
                *TINY).endswith("lower --max-shots or pass --allow-repeats to reuse its images")
    for fix in (["--shots", 1], ["--shots", 4, "--allow-repeats"]):             # what the lines say runs
        assert run("--dataset", few, *fix, "--clip-checkpoint", tiny_vit_checkpoint, *TINY, "--epochs", 1,
                   "--seeds", 1)["seeds"]


def test_an_unreadable_class_folder_is_named(tmp_path, monkeypatch):
    touch(tmp_path / "mine", *[f"a/{f}" for f in class_files(3)], *[f"b/sub/{f}" for f in class_files(3)])
    scandir = os.scandir

    def denied(path="."):  # as a folder without read permission (chmod 0 does not stop root, who runs CI)
        if Path(path).name == "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(DataError, match=r"^cannot read the folder .*/mine/b/sub \(Permission denied\); fix"):
        fd.load_splits(str(tmp_path / "mine"), None)
