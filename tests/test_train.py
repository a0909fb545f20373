"""train.py end to end on small synthetic features files (CPU, seconds), and once from images."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from extract_features import FORMAT, write_atomic

REPO = Path(__file__).resolve().parents[1]


def synthetic_features(path, C=10, d=32, max_shots=4, views=3, test_per_class=30, text_noise=1.2,
                       backbone="synthetic", seeds=(1, 2, 3), negatives=True, seed=0):
    """A features file in the documented format for a task whose classes are Gaussian blobs on the sphere.

    The positive text features are the class centres pushed away by text_noise, so zero-shot is weak
    and the few-shot images carry the information.
    """
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(C, d, generator=g), dim=-1)                    # [C, d]
    images = lambda labels: F.normalize(centres[labels] + 0.25 * torch.randn(len(labels), d, generator=g), dim=-1)
    pool = 2 * max_shots                                                              # train images per class
    train_labels = torch.arange(C).repeat_interleave(pool)                            # [N]
    train_views = torch.stack([images(train_labels) for _ in range(views)])          # [V, N, d]
    test_labels = torch.arange(C).repeat_interleave(test_per_class)
    val_labels = torch.arange(C).repeat_interleave(4)
    text = F.normalize(centres + text_noise * F.normalize(torch.randn(C, d, generator=g), dim=-1), dim=-1)
    fewshot = {s: torch.stack([c * pool + torch.randperm(pool, generator=g)[:max_shots] for c in range(C)])
               for s in seeds}
    data = {
        "format": FORMAT, "dataset": "synthetic", "backbone": backbone, "logit_scale": 100.0,
        "classnames": [f"class {c}" for c in range(C)], "prompts": {"positive": [], "negative": []},
        "text": {"positive": text.half()},
        "train": {"features": train_views.half(), "labels": train_labels},
        "val": {"features": images(val_labels).half(), "labels": val_labels},
        "test": {"features": images(test_labels).half(), "labels": test_labels},
        "fewshot": fewshot,
        "val_fewshot": {s: torch.arange(C * 4).view(C, 4) for s in seeds},
    }
    if negatives:
        data["text"]["negative"] = F.normalize(-text + 0.5 * torch.randn(C, d, generator=g), dim=-1).half()
    torch.save(data, path)
    return path


@pytest.fixture
def feats(tmp_path):
    return synthetic_features(tmp_path / "synthetic.pt")


def run(*argv):
    """train.run on the command-line arguments; quick recipe unless the arguments say otherwise."""
    return train.run(train.parse_args([*map(str, argv)]))


def fail(capsys, *argv):
    """train.main on bad arguments: exits non-zero with one 'error:' line; returns that line."""
    capsys.readouterr()                                       # forget what earlier runs printed
    with pytest.raises(SystemExit) as e:
        train.main([*map(str, argv)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("method", train.METHODS)
def test_every_method_runs_end_to_end(feats, method, tmp_path):
    out = tmp_path / "r.json"
    r = run("--features", feats, "--method", method, "--shots", 2, "--epochs", 3, "--out", out)
    assert set(r["seeds"]) == {1, 2, 3}
    assert all(0.0 <= a <= 100.0 for a in r["seeds"].values())
    assert json.loads(out.read_text())["method"] == method


def test_results_json_schema(feats, tmp_path):
    out = tmp_path / "results.json"
    run("--features", feats, "--shots", 4, "--epochs", 2, "--out", out, "--beta-vp", 0.25)
    r = json.loads(out.read_text())
    for key, kind in [("method", str), ("dataset", str), ("backbone", str), ("shots", int), ("seeds", dict),
                      ("test_accuracy", float), ("std", float), ("epoch_seconds", dict), ("config", dict)]:
        assert isinstance(r[key], kind), key
    assert r["method"] == "hegraph" and r["dataset"] == "synthetic" and r["shots"] == 4
    accs = list(r["seeds"].values())
    assert set(r["seeds"]) == {"1", "2", "3"}
    assert r["test_accuracy"] == pytest.approx(sum(accs) / 3)
    assert r["std"] == pytest.approx(torch.tensor(accs).std().item())
    assert r["config"]["hegraph"]["beta_vp"] == 0.25 and r["config"]["lr"] is None   # recipe default
    assert all(s > 0 for s in r["epoch_seconds"].values())


def test_hegraph_beats_zeroshot_when_the_text_is_off(tmp_path):
    feats = synthetic_features(tmp_path / "f.pt", C=12, text_noise=1.5, seeds=(1,))
    zs = run("--features", feats, "--method", "zeroshot", "--shots", 4, "--seeds", 1)["test_accuracy"]
    hg = run("--features", feats, "--method", "hegraph", "--shots", 4, "--seeds", 1, "--epochs", 50,
             "--lr", 0.01)["test_accuracy"]
    text_only = run("--features", feats, "--method", "hegraph-t", "--shots", 4, "--seeds", 1, "--epochs", 50,
                    "--lr", 0.01)["test_accuracy"]
    assert zs < 75, "the synthetic text must be a poor classifier for this test to mean anything"
    # measured: zero-shot 66.4, hegraph 79.2, hegraph-t 79.2: the adapted text classifier did it
    assert hg >= zs + 8 and text_only >= zs + 8, (zs, hg, text_only)


def test_same_seed_same_accuracy_and_seeds_differ(feats):
    a = run("--features", feats, "--shots", 2, "--epochs", 3, "--seeds", 1, 2)
    b = run("--features", feats, "--shots", 2, "--epochs", 3, "--seeds", 1, 2)
    assert a["seeds"] == b["seeds"]


def test_training_changes_the_model_and_eval_only_reproduces_it(feats, tmp_path):
    trained = run("--features", feats, "--shots", 4, "--epochs", 5, "--seeds", 1, "--save", tmp_path / "ck")
    ckpt = torch.load(tmp_path / "ck" / "seed1.pt", weights_only=True)
    assert ckpt["state_dict"]["W_p"].abs().sum() > 0          # it learned something
    again = run("--features", feats, "--eval-only", "--load", tmp_path / "ck", "--seeds", 1)
    assert again["seeds"] == trained["seeds"] and again["method"] == "hegraph"


def test_no_negatives(tmp_path, capsys):
    feats = synthetic_features(tmp_path / "f.pt", negatives=False)
    line = fail(capsys, "--features", feats, "--method", "hegraph", "--epochs", 1, "--shots", 2)
    assert "--no-negatives" in line
    tp = run("--features", feats, "--method", "hegraph-tp", "--epochs", 2, "--shots", 2)
    t = run("--features", feats, "--method", "hegraph-t", "--no-negatives", "--epochs", 2, "--shots", 2)
    assert tp["seeds"] == t["seeds"]                          # T-P is T without the negative nodes
    run("--features", feats, "--method", "tip-f", "--epochs", 1, "--shots", 2)   # baselines need none


def test_search_val_tunes_on_validation_only(feats, tmp_path):
    r = run("--features", feats, "--method", "tip", "--shots", 2, "--search-val", "--seeds", 1)
    alpha, gamma = r["alpha_gamma"][1]
    assert 0.1 <= alpha <= 5 and gamma > 0


def test_bad_inputs_fail_with_one_clear_line(feats, tmp_path, capsys):
    assert "invalid choice" in fail(capsys, "--dataset", "nope")
    assert "invalid choice" in fail(capsys, "--features", feats, "--method", "nope")
    assert "max-shots" in fail(capsys, "--features", feats, "--shots", 5)
    assert "seed 7" in fail(capsys, "--features", feats, "--seeds", 7)
    torch.save({"format": "something-else"}, tmp_path / "wrong.pt")
    assert FORMAT in fail(capsys, "--features", tmp_path / "wrong.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    assert "not a readable features file" in fail(capsys, "--features", tmp_path / "text.pt")
    assert "does not exist" in fail(capsys, "--features", tmp_path / "missing.pt")


def test_checkpoint_from_another_backbone_or_class_count_is_refused(feats, tmp_path, capsys):
    run("--features", feats, "--shots", 2, "--epochs", 1, "--seeds", 1, "--save", tmp_path / "ck")
    other_c = synthetic_features(tmp_path / "c.pt", C=11)
    other_b = synthetic_features(tmp_path / "b.pt", backbone="ViT-B/16")
    assert "11 classes" in fail(capsys, "--features", other_c, "--eval-only", "--load", tmp_path / "ck", "--seeds", 1)
    assert "ViT-B/16" in fail(capsys, "--features", other_b, "--eval-only", "--load", tmp_path / "ck", "--seeds", 1)


def test_a_failed_run_leaves_existing_results_untouched(feats, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("previous results")
    fail(capsys, "--features", feats, "--shots", 99, "--out", out)
    assert out.read_text() == "previous results"
    with pytest.raises(RuntimeError):                        # a write that dies half-way
        write_atomic(out, lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("disk full"))))
    assert out.read_text() == "previous results"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary left


def test_schedule_warms_up_from_1e5_then_decays_to_zero():
    lr, per_epoch, total = 1e-3, 10, 100
    assert train.schedule(0, per_epoch, total, lr) == pytest.approx(train.WARMUP_LR)
    assert train.schedule(per_epoch, per_epoch, total, lr) == pytest.approx(lr)
    assert train.schedule(total, per_epoch, total, lr) == pytest.approx(0.0, abs=1e-12)
    decay = [train.schedule(s, per_epoch, total, lr) for s in range(per_epoch, total)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_shift_sets_use_the_text_classifier_on_mapped_classes(feats, tmp_path):
    """A shift set whose 3 classes are ImageNet classes 7, 2, 5: its logits are those columns."""
    run("--features", feats, "--method", "hegraph-t", "--shots", 2, "--epochs", 2, "--seeds", 1,
        "--save", tmp_path / "ck")
    data = torch.load(feats, weights_only=True)
    class_map = torch.tensor([7, 2, 5])
    test = data["test"]["features"][torch.isin(data["test"]["labels"], class_map)]
    labels = data["test"]["labels"][torch.isin(data["test"]["labels"], class_map)]
    shift = {"format": FORMAT, "dataset": "imagenet-sketch", "backbone": "synthetic", "logit_scale": 100.0,
             "classnames": ["a", "b", "c"], "class_map": class_map,
             "text": {"positive": data["text"]["positive"][class_map]},
             "test": {"features": test, "labels": (labels[:, None] == class_map).int().argmax(1)}}
    ckpt = train.load_checkpoint(tmp_path / "ck" / "seed1.pt", data, 1)
    task = train.make_task(data, 1, 2, "cpu")
    model = train.build_model("hegraph-t", task, train.HeGraphConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    acc = train.shift_accuracy(model, shift, 100.0)
    full = train.accuracy(model, test.float(), labels)        # same images, all 10 classes
    assert acc >= full                                        # fewer classes to confuse
    restricted = model(test.float())[:, class_map].argmax(1)
    expected = 100.0 * (class_map[restricted] == labels).float().mean().item()
    assert acc == pytest.approx(expected)
    # the same through the command line: --eval-only --eval-datasets, the shift file found by its name
    torch.save(shift, tmp_path / "imagenet-sketch_synthetic.pt")
    r = run("--features", feats, "--eval-only", "--load", tmp_path / "ck", "--seeds", 1, "--backbone", "synthetic",
            "--features-dir", tmp_path, "--root", tmp_path / "no-data", "--eval-datasets", "imagenet-sketch")
    assert r["shift"]["imagenet-sketch"][1] == pytest.approx(acc)


def test_pipeline_from_images_through_the_command_line(make_dataset, tiny_vit_checkpoint, tmp_path):
    """python train.py --dataset dtd --root ... --clip-checkpoint ...: extraction, training, results."""
    root = make_dataset("dtd")
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "train.py"), "--dataset", "dtd", "--root", str(root),
           "--clip-checkpoint", str(tiny_vit_checkpoint), "--backbone", "tiny", "--shots", "2",
           "--max-shots", "4", "--views", "2", "--seeds", "1", "--epochs", "2", "--workers", "0",
           "--device", "cpu", "--features-dir", str(tmp_path / "features"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "features" / "dtd_tiny.pt").is_file()
    r = json.loads(out.read_text())
    assert r["dataset"] == "dtd" and r["backbone"] == "tiny" and set(r["seeds"]) == {"1"}
    assert "mean" in proc.stdout
    # a second run reuses the features file and gives the same accuracy
    proc2 = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc2.returncode == 0 and "reusing" in proc2.stdout
    assert json.loads(out.read_text())["seeds"] == r["seeds"]
