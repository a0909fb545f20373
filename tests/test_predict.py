"""predict.py and fewshot.classify: a model trained on a folder of your own classifies new images from its model
files alone (no features file, no dataset), its predictions of the test images are --eval-only's, and its CLIP is
checked to be the model's. The bad model files and inputs are cases of the registry (fewshot/testing/bad_inputs.py).
"""
import csv
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fewshot import checkpoints, classify, training
from fewshot.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def test_one_command_classifies_new_images_without_the_features_or_the_dataset(own_model, tmp_path, capsys):
    home, photos = own_model["home"], own_model["photos"]
    assert not (home / "my_images").exists() and not list((home / "features").glob("*.pt"))
    new = tmp_path / "new_photo.jpg"
    shutil.copy(photos / "red_panda" / "0.jpg", new)
    (tmp_path / "notes.jpg").write_text("not an image")
    capsys.readouterr()
    rows = classify.predict_command(["--model", str(own_model["models"]), str(new), str(photos / "tabby_cat"),
                                     str(tmp_path / "notes.jpg"), "--top-k", "2", "--out", str(tmp_path / "p.csv")])
    out, err = capsys.readouterr()
    images = [str(new)] + [str(p) for p in sorted((photos / "tabby_cat").iterdir())]
    assert [image for image, _ in rows] == images                           # the unreadable one is left out
    assert err.strip() == f"skipped {tmp_path / 'notes.jpg'} (cannot identify image file " \
                          f"'{tmp_path / 'notes.jpg'}')"
    names = own_model["data"]["classnames"]
    for line, (image, top) in zip(out.splitlines(), rows):
        assert len(top) == 2 and top[0][1] >= top[1][1] and {n for n, _ in top} <= set(names)
        assert line == f"{image}  {top[0][0]} {100 * top[0][1]:.1f} %, {top[1][0]} {100 * top[1][1]:.1f} %"
    with open(tmp_path / "p.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["image", "class_1", "probability_1", "class_2", "probability_2"]
    assert [r[0] for r in table[1:]] == images and table[1][1] == rows[0][1][0][0]
    assert float(table[1][2]) == pytest.approx(rows[0][1][0][1], abs=1e-6)
    # JSON, one seed: that seed's model alone
    classify.predict_command(["--model", str(own_model["models"]), str(new), "--seed", "2", "--out",
                              str(tmp_path / "p.json")])
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["seeds"] == [2] and saved["method"] == "hegraph" and saved["predictions"][0]["image"] == str(new)
    one = classify.load_classifier(own_model["models"], seed=2).predict([new])[0]
    assert saved["predictions"][0]["top"][0]["probability"] == pytest.approx(one.max().item())


def test_the_readmes_predict_command_runs_as_written(own_model, readme_command, tmp_path, capsys):
    """In a folder holding the model folder, a new photo and a folder of more: its line per image, its CSV."""
    argv = readme_command("python predict.py")
    shutil.copytree(own_model["models"], tmp_path / argv[argv.index("--model") + 1])
    shutil.copy(own_model["photos"] / "red_panda" / "0.jpg", tmp_path / "new_photo.jpg")
    shutil.copytree(own_model["photos"] / "tabby_cat", tmp_path / "more_photos")
    capsys.readouterr()
    rows = classify.predict_command(argv)
    assert len(rows) == 1 + len(list((tmp_path / "more_photos").iterdir()))
    assert capsys.readouterr().out.splitlines()[0].startswith("new_photo.jpg  ")
    assert (tmp_path / "predictions.csv").read_text().splitlines()[0] == \
        "image,class_1,probability_1,class_2,probability_2,class_3,probability_3"


def test_predictions_of_the_test_images_are_eval_onlys(own_model):
    """Each test image read from disk and encoded by predict's path gets the class --eval-only's model gives its
    stored features, so per seed the accuracy and the confusion matrix are --eval-only's; the seeds ensemble as
    the mean of their probabilities."""
    data, evaluated = own_model["data"], own_model["evaluated"]
    paths = [own_model["photos"] / p for p in data["paths"]["test"]]
    labels = data["test"]["labels"]
    stored = data["test"]["features"].float()
    per_seed = {}
    for seed in (1, 2):
        classifier = classify.load_classifier(own_model["models"], seed=seed, device="cpu")
        feats, problems = classifier.encode([str(p) for p in paths])
        assert not problems and torch.allclose(torch.stack(feats), stored, atol=2e-3)  # the stored features, again
        probs = classifier.predict(paths)
        per_seed[seed] = probs
        model = checkpoints.build_model(checkpoints.read_model(own_model["models"] / f"seed{seed}.pt"), "x")
        assert torch.equal(probs.argmax(1), training.predictions(model, stored))   # --eval-only's model's
        assert torch.equal(classifier.predict_features(data["test"]["features"]).argmax(1), probs.argmax(1))
        confusion = training.confusion_matrix(probs.argmax(1), labels, len(data["classnames"]))
        assert confusion.tolist() == evaluated["confusion"][seed]
        assert 100.0 * (probs.argmax(1) == labels).sum().item() / len(labels) == evaluated["seeds"][seed]
    assert evaluated["seeds"] == own_model["trained"]["seeds"]                      # --eval-only is the trained run
    both = classify.load_classifier(own_model["models"]).predict(paths)
    assert torch.allclose(both, (per_seed[1] + per_seed[2]) / 2, atol=1e-6)


def test_the_clip_must_be_the_models(own_model, tmp_path, tiny_resnet_checkpoint, tiny_vit_checkpoint):
    """Another CLIP with the same feature size is refused by what it does (its text features of the model's
    prompts), and a model whose recorded checkpoint has moved is pointed to --clip-checkpoint."""
    image = own_model["photos"] / "red_panda" / "0.jpg"
    other = classify.load_classifier(own_model["models"], clip_checkpoint=tiny_resnet_checkpoint)
    with pytest.raises(DataError, match=rf"^--clip-checkpoint {tiny_resnet_checkpoint} is not the CLIP the model "
                                        r"in .* was trained with: it encodes a fixed probe image into other features "
                                        r"than the extraction did \(cosine -?0\.\d+\); pass the CLIP its features "
                                        r"were extracted with \(ViT-l1-w64-p16-32px-d32\)$"):
        other.predict([image])
    # the same image tower with another text tower (the tiny CLIPs draw a tensor from its name alone, so the ResNet
    # above shares the ViT's text tower: the probe images tell them apart, this one the prompts)
    state = torch.load(tiny_vit_checkpoint, weights_only=True)
    state["token_embedding.weight"] = state["token_embedding.weight"].flip(0)
    torch.save(state, tmp_path / "other_text.pt")
    with pytest.raises(DataError, match=r"is not the CLIP .* it encodes the prompts of class 'red panda' into other "
                                        r"text features \(cosine"):
        classify.load_classifier(own_model["models"], clip_checkpoint=tmp_path / "other_text.pt").predict([image])
    moved = tmp_path / "moved"
    moved.mkdir()
    record = torch.load(own_model["models"] / "seed1.pt", weights_only=True)
    record["clip"]["clip_checkpoint"] = str(tmp_path / "gone.pt")
    torch.save(record, moved / "seed1.pt")
    with pytest.raises(DataError, match=r"checkpoint .*gone.pt, which is not there: pass --clip-checkpoint"):
        classify.load_classifier(moved).predict([image])
    again = classify.load_classifier(moved, clip_checkpoint=tiny_vit_checkpoint).predict([Image.open(image)])
    assert torch.allclose(again, classify.load_classifier(own_model["models"], seed=1).predict([image]))


def test_predict_py_is_a_thin_entry_point(tmp_path, monkeypatch, capsys):
    """python predict.py (its __main__, run here): one line for a folder that holds no model."""
    monkeypatch.setattr(sys, "argv", ["predict.py", "--model", "nowhere", "x.jpg"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "predict.py"), run_name="__main__")
    assert e.value.code == 2 and capsys.readouterr().err == ("error: --model nowhere: no such file or folder; give "
                                                             "the folder that train.py --save wrote\n")


def test_an_open_clip_folder_model_encodes_with_its_own_preprocessing(tiny_open_clip_dir, tmp_path, run):
    """A model of a local-dir: open_clip CLIP (48 px, squash resize, its own mean and std, bilinear): predict.py
    loads that CLIP and its recorded preprocessing, and gets the features file's test features back."""
    from fewshot.features import load_features
    from fewshot.testing.fixtures import write_image_folder
    write_image_folder(tmp_path / "mine", {"ant": 6, "bee": 6})
    run("--dataset", tmp_path / "mine", "--backbone", f"local-dir:{tiny_open_clip_dir}", "--shots", 1, "--max-shots",
        1, "--views", 2, "--seeds", 1, "--epochs", 2, "--method", "tip-f", "--device", "cpu", "--workers", 0,
        "--save", tmp_path / "m", "--features-dir", tmp_path / "features")
    data = load_features(next((tmp_path / "features").glob("*.pt")))
    record = checkpoints.read_model(tmp_path / "m" / "seed1.pt")
    assert record["clip"]["preprocess"]["resize_mode"] == "squash" and record["clip"]["preprocess"]["size"] == [48, 48]
    classifier = classify.load_classifier(tmp_path / "m")
    feats, problems = classifier.encode([str(tmp_path / "mine" / p) for p in data["paths"]["test"]])
    assert not problems and torch.allclose(torch.stack(feats), data["test"]["features"].float(), atol=2e-3)
    assert torch.equal(classifier.predict_features(torch.stack(feats)).argmax(1),
                       classifier.predict_features(data["test"]["features"]).argmax(1))
    # the recorded preprocessing is the one used: another mean makes the probe images encode otherwise
    record["clip"]["preprocess"]["mean"] = [0.0, 0.0, 0.0]
    torch.save(record, tmp_path / "m" / "seed1.pt")
    with pytest.raises(DataError, match="encodes a fixed probe image into other features"):
        classify.load_classifier(tmp_path / "m").predict([tmp_path / "mine" / data["paths"]["test"][0]])
