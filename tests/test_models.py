"""Model files (--save) and what a run records: a file rebuilds its model from itself alone, --eval-only checks
every field it records against the run, a --save folder is written by one run at a time, and each run's results
hold its sizes, per-class accuracy and confusion matrices (--plots draws them)."""
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import fewshot.features as ff
from fewshot import checkpoints, files, methods, runs, tasks, training
from fewshot.testing.fixtures import synthetic_features


# coop runs CLIP's text encoder, which synthetic features lack: tests/test_coop.py saves, evaluates and predicts it
@pytest.mark.parametrize("method", [name for name, row in methods.METHODS.items() if not row.text_encoder])
def test_a_model_file_rebuilds_its_model_alone(feats, method, tmp_path, run):
    """Every method's file holds what its model needs: rebuilt from the file, with the features file gone, it
    gives the trained model's logits exactly."""
    negatives = "--no-negatives" if method == "hegraph-tp" else None
    run("--features", feats, "--method", method, "--shots", 2, "--epochs", 2, "--seeds", 1, "--save", tmp_path / "m",
        *([negatives] if negatives else []))
    data = ff.load_features(feats)
    task = tasks.make_task(data, 1, 2, "cpu", bool(methods.METHODS[method].negatives) and not negatives)
    record = checkpoints.read_model(tmp_path / "m" / "seed1.pt")
    assert record["classnames"] == data["classnames"] and record["logit_scale"] == data["logit_scale"]
    assert torch.equal(record["cache"]["features"], task.cache_feats) and record["features"]["path"] == str(feats)
    trained = methods.build(methods.METHODS[method], task, methods.METHODS[method].config("synthetic").__class__(
        **record["model_config"]))
    trained.load_state_dict(record["state_dict"])
    feats_path = tmp_path / "moved.pt"
    feats.rename(feats_path)
    rebuilt = checkpoints.build_model(checkpoints.read_model(tmp_path / "m" / "seed1.pt"), "m")
    x = data["test"]["features"].float()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained.eval()(x))


def test_eval_only_compares_what_the_file_records_with_the_run(feats, tmp_path, run, fail):
    ck = tmp_path / "ck"
    trained = run("--features", feats, "--shots", 2, "--epochs", 3, "--seeds", 1, 2, "--save", ck)
    # a renamed file: its recorded seed is not its name's
    (ck / "seed2.pt").unlink()
    (ck / "seed1.pt").rename(ck / "seed2.pt")
    assert fail("--features", feats, "--eval-only", "--load", ck, "--seeds", 2) == (
        f"error: {ck / 'seed2.pt'} holds the model of seed 1, not of seed 2 (a renamed file?): name it seed1.pt, "
        f"or train seed 2 with --save {ck}")
    (ck / "seed2.pt").rename(ck / "seed1.pt")
    assert fail("--features", feats, "--eval-only", "--load", ck, "--seeds", 1, 2) == (
        f"error: --load {ck} holds no model of seed 2 (it holds seeds 1): pass --seeds 1, or train seed 2 with "
        f"--save {ck}")
    assert fail("--features", feats, "--eval-only", "--load", ck / "seed1.pt") == (
        f"error: --load {ck / 'seed1.pt'} is a file; --load takes the folder that --save wrote: pass --load {ck} "
        f"--seeds 1")
    # flags that cannot apply to a saved model are refused, not dropped
    for flag in (["--alpha", 5], ["--epochs", 3], ["--lr", 0.1], ["--bias-scale", 0.2]):
        line = fail("--features", feats, "--eval-only", "--load", ck, "--seeds", 1, *flag)
        assert line.startswith(f"error: {flag[0]} sets how a model is built or trained, and --eval-only evaluates")
    assert "--save writes the models a run trains" in fail("--features", feats, "--eval-only", "--load", ck,
                                                           "--seeds", 1, "--save", tmp_path / "again")
    # features with the same classes, backbone and sizes but other few-shot images: its test images are not the
    # ones the model never saw
    other = synthetic_features(tmp_path / "other.pt", seed=7)
    line = fail("--features", other, "--eval-only", "--load", ck, "--seeds", 1)
    assert f"{ck / 'seed1.pt'} was trained on other images than seed 1's few-shot images in {other}" in line
    assert str(feats) in line
    # the model carries its negative text features: a file without them still evaluates it, to the same number
    data = torch.load(feats, weights_only=True)
    del data["text"]["negative"]
    torch.save(data, tmp_path / "no_negatives.pt")
    r = run("--features", tmp_path / "no_negatives.pt", "--eval-only", "--load", ck, "--seeds", 1)
    assert r["seeds"][1] == trained["seeds"][1]


def test_search_val_names_a_seed_without_a_validation_subset(tmp_path, fail):
    feats = synthetic_features(tmp_path / "f.pt")
    data = torch.load(feats, weights_only=True)
    del data["val_fewshot"][2]
    torch.save(data, feats)
    assert fail("--features", feats, "--shots", 2, "--search-val", "--seeds", 1, 2, "--epochs", 1) == (
        f"error: --search-val tunes on each seed's validation subset, and {feats} has none for seed 2 (it has them "
        f"for seeds 1 3): run those --seeds, or extract the features again with --seeds 1 2 (--overwrite replaces "
        f"the file)")


def test_a_save_folder_is_written_by_one_run_at_a_time(feats, tmp_path, run, capsys):
    """While another process holds the folder, a run waits (and says so) before it looks at what the folder
    holds; once the other is done it goes on."""
    ck = tmp_path / "ck"
    lock = files.file_lock(ck.resolve())
    lock.acquire()
    done = []
    worker = threading.Thread(target=lambda: done.append(run("--features", feats, "--shots", 2, "--epochs", 1,
                                                             "--seeds", 1, "--save", ck)))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive() and not (ck / "seed1.pt").exists()
    lock.release()
    worker.join(60)
    assert done and (ck / "seed1.pt").exists()
    assert f"waiting for another process to finish writing {ck}" in capsys.readouterr().out


def test_every_run_records_its_sizes_per_class_accuracy_and_confusion(feats, tmp_path, run, capsys):
    out = tmp_path / "r.json"
    r = run("--features", feats, "--method", "tip", "--shots", 2, "--seeds", 1, "--out", out, "--plots")
    saved = json.loads(out.read_text())
    data = torch.load(feats, weights_only=True)
    C, T = len(data["classnames"]), len(data["test"]["labels"])
    assert saved["classnames"] == data["classnames"] and saved["test_size"] == T
    assert saved["split_sizes"] == {"train": 2 * C, "val": 2 * C, "test": T}
    confusion = torch.tensor(saved["confusion"]["1"])                               # [C, C]
    assert confusion.sum(1).tolist() == torch.bincount(data["test"]["labels"], minlength=C).tolist()
    assert 100.0 * confusion.trace().item() / T == saved["seeds"]["1"] == r["seeds"][1]
    per_class = saved["per_class"]["1"]
    assert per_class == pytest.approx((100.0 * confusion.diag() / confusion.sum(1)).tolist())
    assert saved["std"] is None                                                      # one seed: no spread
    shown = capsys.readouterr().out
    assert f"test set {T} images of {C} classes; each seed trains on {2 * C} images (2 per class), its validation " \
           f"subset holds {2 * C}" in shown
    assert "mean" in shown and "(1 seed)" in shown and "± 0.00" not in shown
    weakest = min(range(C), key=lambda c: (per_class[c], c))
    wrong = confusion[weakest].clone()
    wrong[weakest] = 0
    line = shown.split("most often taken for\n")[1].splitlines()[0]
    assert line.split() == [*data["classnames"][weakest].split(), f"{per_class[weakest]:.2f}",
                            *data["classnames"][int(wrong.argmax())].split(),
                            f"({100 * wrong.max().item() / confusion[weakest].sum().item():.0f}", "%", "of", "its",
                            "test", "images)"]
    with Image.open(tmp_path / "confusion.png") as png:
        assert png.format == "PNG" and png.width >= 600 and png.height >= 600
    assert len(json.loads(out.read_text())["confusion"]["1"]) == C
    lines = out.read_text().splitlines()
    for row in json.loads(out.read_text())["confusion"]["1"]:                     # a matrix's row on one line
        assert any(line.strip().rstrip(",") == json.dumps(row) for line in lines)


def test_plots_needs_out(feats, fail):
    assert fail("--features", feats, "--shots", 2, "--plots") == \
        "error: --plots draws confusion.png beside the --out file: give --out FILE.json too"


def test_evaluation_predicts_each_test_image_once_and_counts_it_once(feats):
    """The confusion matrix counts training.predictions' classes: its rows are the test labels."""
    data = ff.load_features(feats)
    task = tasks.make_task(data, 1, 2, "cpu")
    model = methods.build(methods.METHODS["tip"], task, methods.METHODS["tip"].config("synthetic"))
    scores = runs.evaluate(model, task, {}, "cpu")
    predicted = training.predictions(model, task.test[0])
    assert scores["test"] == training.accuracy(model, *task.test)
    assert scores["confusion"][task.test[1][0], predicted[0]] >= 1 and scores["confusion"].sum() == len(predicted)


def test_eval_only_reads_the_prompt_set_its_models_were_trained_with(make_dataset, tiny_vit_checkpoint, tmp_path,
                                                                      run):
    """A features file holds every prompt set its runs asked for, its `text` the last one's: models trained with
    an earlier set are evaluated with that set (their own), not refused or scored with another."""
    tiny = ["--dataset", "dtd", "--root", make_dataset("dtd"), "--clip-checkpoint", tiny_vit_checkpoint,
            "--workers", 0, "--device", "cpu", "--max-shots", 2, "--views", 2, "--seeds", 1, "--shots", 2]
    trained = run(*tiny, "--epochs", 2, "--save", tmp_path / "ck")
    run(*tiny, "--method", "zeroshot", "--template", "a blurry photo of a {}.")    # the file's text is now this
    [features] = Path("features").glob("dtd_*.pt")
    assert ff.load_features(features)["text_set"]["template"] == "a blurry photo of a {}."
    again = run("--features", features, "--eval-only", "--load", tmp_path / "ck", "--seeds", 1)
    assert again["seeds"] == trained["seeds"] and again["prompts"] == trained["prompts"]
