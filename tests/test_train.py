"""train.py end to end on small synthetic features files (CPU, seconds), and once from images."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fewshot.features as ff
from fewshot import cli, methods, tasks, training
from fewshot.features import FORMAT
from fewshot.testing.fixtures import TINY_NAMES, synthetic_features
from hegraphadapter import HeGraphConfig

REPO = Path(__file__).resolve().parents[1]


# coop runs CLIP's text encoder, which synthetic features lack: tests/test_coop.py runs it on a tiny CLIP's
@pytest.mark.parametrize("method", [name for name, row in methods.METHODS.items() if not row.text_encoder])
def test_every_method_runs_end_to_end(feats, method, tmp_path, run):
    out = tmp_path / "r.json"
    r = run("--features", feats, "--method", method, "--shots", 2, "--epochs", 3, "--out", out)
    assert set(r["seeds"]) == {1, 2, 3}
    assert all(0.0 <= a <= 100.0 for a in r["seeds"].values())
    saved = json.loads(out.read_text())
    assert saved["method"] == method and saved["params"] == r["params"] >= 0


def test_results_record_what_was_used(feats, tmp_path, run):
    out = tmp_path / "results.json"
    run("--features", feats, "--shots", 4, "--epochs", 2, "--out", out, "--beta-vp", 0.25)
    r = json.loads(out.read_text())
    for key, kind in [("method", str), ("dataset", str), ("backbone", str), ("shots", int), ("seeds", dict),
                      ("test_accuracy", float), ("std", float), ("epoch_seconds", dict), ("params", int),
                      ("recipe", dict), ("model_config", dict)]:
        assert isinstance(r[key], kind), key
    assert r["method"] == "hegraph" and r["dataset"] == "synthetic" and r["shots"] == 4
    accs = list(r["seeds"].values())
    assert set(r["seeds"]) == {"1", "2", "3"}
    assert r["test_accuracy"] == pytest.approx(sum(accs) / 3)
    assert r["std"] == pytest.approx(torch.tensor(accs).std().item())
    # the effective recipe: --epochs as given, the rest the paper's (30 epochs and lr 1e-3 off the table)
    assert r["recipe"] == dict(epochs=2, lr=1e-3, batch_size=256, optimizer="adamw", weight_decay=0.01, eps=1e-8,
                               warmup=True, constant_warmup=False, leave_one_out=True)
    assert r["model_config"]["1"]["beta_vp"] == 0.25 and r["model_config"]["1"]["variant"] == "full"
    assert all(s > 0 for s in r["epoch_seconds"].values())
    C, d = 10, 32
    assert r["params"] == 3 * (d * d + C * d)                                  # W_n, W_p, W_v and b_n, b_p, b_v


@pytest.mark.parametrize("method, recipe", [
    ("tip-f", dict(epochs=20, lr=1e-3, eps=1e-4, warmup=False, leave_one_out=False)),
    ("taskres", dict(epochs=100, lr=2e-3, optimizer="adam", weight_decay=5e-4)),
    ("clip-adapter", dict(epochs=100, lr=2e-3, optimizer="sgd", batch_size=32)),
    ("graphadapter", dict(epochs=100, lr=2e-3, optimizer="adam")),
    ("tip", None), ("zeroshot", None), ("linear-probe", None),
])
def test_each_method_records_its_own_recipe(method, recipe):
    """The recipe of the METHODS row, as the results record it (checked without training)."""
    effective = methods.effective_recipe(method, "synthetic", 4, {})
    if recipe is None:
        assert effective is None
    else:
        assert {k: getattr(effective, k) for k in recipe} == recipe
    # per-dataset entries of the tables
    assert methods.effective_recipe("tip-f", "eurosat", 4, {}).epochs == 100
    assert methods.effective_recipe("taskres", "imagenet", 16, {}).lr == 2e-4
    assert methods.effective_recipe("taskres", "dtd", 8, {}).epochs == 200
    assert methods.effective_recipe("hegraph", "fgvc_aircraft", 1, {}).lr == 1e-2
    # CoOp's epochs per K for CLIP-Adapter, and ImageNet's 50 at every K (COOP.md: *_ep50.yaml for all settings)
    assert [methods.effective_recipe("clip-adapter", "dtd", k, {}).epochs for k in (1, 2, 4, 8, 16)] == \
        [50, 100, 100, 200, 200]
    assert [methods.effective_recipe("clip-adapter", "imagenet", k, {}).epochs for k in (1, 2, 4, 8, 16)] == [50] * 5


def test_hegraph_beats_zeroshot_when_the_text_is_off(tmp_path, run):
    feats = synthetic_features(tmp_path / "f.pt", C=12, text_noise=1.5, seeds=(1,))
    zs = run("--features", feats, "--method", "zeroshot", "--shots", 4, "--seeds", 1)["test_accuracy"]
    hg = run("--features", feats, "--method", "hegraph", "--shots", 4, "--seeds", 1, "--epochs", 50,
             "--lr", 0.03)["test_accuracy"]
    text_only = run("--features", feats, "--method", "hegraph-t", "--shots", 4, "--seeds", 1, "--epochs", 50,
                    "--lr", 0.03)["test_accuracy"]
    assert zs < 75, "the synthetic text must be a poor classifier for this test to mean anything"
    assert hg >= zs + 8 and text_only >= zs + 8, (zs, hg, text_only)


@pytest.mark.parametrize("method, epochs_per_shots", [
    ("clip-adapter", {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}),   # CoOp's epochs per K
    ("taskres", {1: 100, 2: 100, 4: 100, 8: 200, 16: 200}),
])
def test_epochs_follow_the_shot_count_as_published(method, epochs_per_shots):
    found = {k: methods.effective_recipe(method, "dtd", k, {}).epochs for k in epochs_per_shots}
    assert found == epochs_per_shots


def test_same_seed_same_accuracy(feats, run):
    a = run("--features", feats, "--shots", 2, "--epochs", 3, "--seeds", 1, 2)
    b = run("--features", feats, "--shots", 2, "--epochs", 3, "--seeds", 1, 2)
    assert a["seeds"] == b["seeds"]


def test_seeds_are_different_few_shot_tasks(feats):
    data = ff.load_features(feats)
    one, two = (tasks.make_task(data, seed, 2, "cpu") for seed in (1, 2))
    assert not torch.equal(one.train_views, two.train_views)
    assert torch.equal(one.train_labels, two.train_labels)                      # same classes, other images
    assert torch.equal(one.test[0], two.test[0])                                # one shared test split


def test_training_changes_the_model_and_eval_only_reproduces_it(feats, tmp_path, run):
    trained = run("--features", feats, "--shots", 4, "--epochs", 5, "--seeds", 1, "--save", tmp_path / "ck")
    ckpt = torch.load(tmp_path / "ck" / "seed1.pt", weights_only=True)
    assert ckpt["state_dict"]["W_p"].abs().sum() > 0 and ckpt["state_dict"]["b_p"].abs().sum() > 0
    again = run("--features", feats, "--eval-only", "--load", tmp_path / "ck", "--seeds", 1)
    assert again["seeds"] == trained["seeds"] and again["method"] == "hegraph" and again["shots"] == 4


def test_bias_only_ablation_keeps_every_projection_at_zero(feats, tmp_path, run):
    r = run("--features", feats, "--method", "hegraph-bias", "--shots", 4, "--epochs", 5, "--seeds", 1,
            "--save", tmp_path / "ck")
    state = torch.load(tmp_path / "ck" / "seed1.pt", weights_only=True)["state_dict"]
    assert all(state[w].abs().sum() == 0 for w in ("W_n", "W_p", "W_v"))
    assert all(state[b].abs().sum() > 0 for b in ("b_p", "b_v"))
    assert state["b_n"].abs().sum() == 0       # N' reaches the loss only through Â_NP N' W_p, and W_p stays 0
    assert r["params"] == 3 * 10 * 32                                          # the biases only


def test_epochs_0_evaluates_the_starting_point_which_is_tip_adapter(feats, run):
    """--epochs 0 is no training, not "unset": hegraph with every W and b at zero is zero-shot + Tip-Adapter
    (with hegraph's α and γ: Tip-Adapter's own start is its dataset's α and γ = 1)."""
    hg = run("--features", feats, "--method", "hegraph", "--shots", 2, "--epochs", 0)
    tip = run("--features", feats, "--method", "tip", "--shots", 2, "--alpha", 1, "--gamma", 5)
    assert hg["seeds"] == tip["seeds"] and hg["recipe"]["epochs"] == 0
    trained = run("--features", feats, "--method", "hegraph", "--shots", 2, "--epochs", 3, "--lr", 0.03)
    assert trained["seeds"] != hg["seeds"]


def test_each_hegraph_config_field_is_a_flag_of_its_type():
    """One flag per HeGraphConfig field, parsed as the field's type: an int stays an int, a str a str, and a
    bool is --x / --no-x."""
    strings = {"own_class_paths": "vp,vv", "message_activation": "tanh"}   # values the str fields accept
    argv, expected = ["--features", "x"], {}
    for f in dataclasses.fields(HeGraphConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "variant":                                           # set by --method, not a flag
            continue
        if f.type is bool:
            argv, expected[f.name] = argv + [flag], True
        elif f.type is str:
            argv, expected[f.name] = argv + [flag, strings[f.name]], strings[f.name]
        else:
            argv, expected[f.name] = argv + [flag, "3"], f.type(3)
    assert {type(v) for v in expected.values()} == {bool, int, float, str}
    config = methods.configure("hegraph", "synthetic", cli.train_request(argv).config)
    for name, value in expected.items():
        assert getattr(config, name) == value and type(getattr(config, name)) is type(value), name
    assert cli.train_request(["--features", "x", "--no-centre-messages"]).config["centre_messages"] is False
    assert "centre_messages" not in cli.train_request(["--features", "x"]).config       # not given: the default


def test_hegraph_at_zero_has_the_tip_adapter_logits_through_train_py(feats):
    """End to end through train.py's own task building and METHODS rows, not only in the model's tests."""
    data = ff.load_features(feats)
    config = cli.train_request(["--features", str(feats), "--alpha", "1.7", "--gamma", "3.0"]).config
    task = tasks.make_task(data, 1, 3, "cpu")
    hegraph = methods.build(methods.METHODS["hegraph"], task, methods.configure("hegraph", "synthetic", config))
    tip = methods.build(methods.METHODS["tip"], task, methods.configure("tip", "synthetic", config))
    assert tip.config.alpha == 1.7 and hegraph.config.gamma == 3.0
    x = task.test[0][:50]
    assert torch.allclose(hegraph.eval()(x), tip(x), atol=1e-4)
    with torch.no_grad():
        hegraph.b_v.add_(0.5)
    assert not torch.allclose(hegraph(x), tip(x), atol=1e-2)                   # the check can fail


def test_no_negatives(tmp_path, run):
    """(hegraph on a file without negatives: the bad-input registry's no-negatives.)"""
    feats = synthetic_features(tmp_path / "f.pt", negatives=False)
    tp = run("--features", feats, "--method", "hegraph-tp", "--epochs", 2, "--shots", 2)
    t = run("--features", feats, "--method", "hegraph-t", "--no-negatives", "--epochs", 2, "--shots", 2)
    assert tp["seeds"] == t["seeds"]                          # T-P is T without the negative nodes
    run("--features", feats, "--method", "tip-f", "--epochs", 1, "--shots", 2)   # baselines need none


def test_shift_sets_use_each_models_prediction_on_mapped_classes(feats, tmp_path, run):
    """A shift set whose 3 classes are ImageNet classes 7, 2, 5: its logits are those columns."""
    run("--features", feats, "--method", "hegraph-t", "--shots", 2, "--epochs", 2, "--seeds", 1,
        "--save", tmp_path / "ck")
    data = torch.load(feats, weights_only=True)
    class_map = torch.tensor([7, 2, 5])
    keep = torch.isin(data["test"]["labels"], class_map)
    test, labels = data["test"]["features"][keep], data["test"]["labels"][keep]
    shift = {"format": FORMAT, "dataset": "imagenet-sketch", "backbone": "synthetic", "logit_scale": 100.0,
             "classnames": ["a", "b", "c"], "class_map": class_map,
             "text": {"positive": data["text"]["positive"][class_map]},
             "test": {"features": test, "labels": (labels[:, None] == class_map).int().argmax(1)}}
    torch.save(shift, tmp_path / "imagenet-sketch_synthetic.pt")
    # --backbone is left at its default (RN50): the shift file is looked up by the loaded file's backbone
    r = run("--features", feats, "--eval-only", "--load", tmp_path / "ck", "--seeds", 1,
            "--features-dir", tmp_path, "--root", tmp_path / "no-data", "--eval-datasets", "imagenet-sketch")
    task = tasks.make_task(ff.load_features(feats), 1, 2, "cpu")
    model = methods.build(methods.METHODS["hegraph-t"], task, HeGraphConfig(variant="t"))
    model.load_state_dict(torch.load(tmp_path / "ck" / "seed1.pt", weights_only=True)["state_dict"])
    restricted = model.eval()(test.float())[:, class_map].argmax(1)
    expected = 100.0 * (class_map[restricted] == labels).float().mean().item()
    assert r["shift"]["imagenet-sketch"][1] == pytest.approx(expected)
    assert expected >= training.accuracy(model, test.float(), labels)           # fewer classes to confuse


def test_schedule_warms_up_from_1e5_then_decays_to_zero():
    lr, per_epoch, total = 1e-3, 10, 100
    assert training.schedule(0, per_epoch, total, lr) == pytest.approx(methods.WARMUP_LR)
    assert training.schedule(per_epoch, per_epoch, total, lr) == pytest.approx(lr)
    assert training.schedule(total, per_epoch, total, lr) == pytest.approx(0.0, abs=1e-12)
    decay = [training.schedule(s, per_epoch, total, lr) for s in range(per_epoch, total)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))



def test_pipeline_from_images_through_the_command_line(make_dataset, tiny_vit_checkpoint, tmp_path, run, capsys):
    """python train.py --dataset dtd --root ... --clip-checkpoint ...: extraction, training, results; the ViT
    checkpoint, passed without --backbone, is named from its weights everywhere, never the default RN50."""
    root = make_dataset("dtd")
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "train.py"), "--dataset", "dtd", "--root", str(root),
           "--clip-checkpoint", str(tiny_vit_checkpoint), "--shots", "2", "--save", str(tmp_path / "ck"),
           "--max-shots", "4", "--views", "2", "--seeds", "1", "--epochs", "2", "--workers", "0",
           "--device", "cpu", "--features-dir", str(tmp_path / "features"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vit = TINY_NAMES["vit"]
    assert [p.name for p in (tmp_path / "features").glob("*.pt")] == [f"dtd_{vit}.pt"]
    r = json.loads(out.read_text())
    assert r["dataset"] == "dtd" and r["backbone"] == vit and set(r["seeds"]) == {"1"}
    assert f"on dtd ({vit}), 2 shots" in proc.stdout and "mean" in proc.stdout
    f = torch.load(tmp_path / "features" / f"dtd_{vit}.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "ck" / "seed1.pt", weights_only=True)
    assert f["backbone"] == f["settings"]["backbone"] == ckpt["run"]["backbone"] == vit
    assert "RN50" not in proc.stdout + proc.stderr + out.read_text() + json.dumps(f["settings"])
    # what was used: the features file extracted (its path), its views and prompts, each seed's recipe
    assert r["features"] == str(tmp_path / "features" / f"dtd_{vit}.pt") and r["extracted"] is True
    assert r["views"] == 2 and r["prompts"]["sha256"] == f["settings"]["prompts_sha256"]
    assert r["prompts"]["prompts"] == "templates" and r["effective_recipe"]["1"] == r["recipe"]
    # a second run (in this process: the command line was tested above) reuses the file, same accuracy
    capsys.readouterr()
    run(*cmd[2:])
    assert "reusing" in capsys.readouterr().out
    assert json.loads(out.read_text())["seeds"] == r["seeds"]


def test_train_does_not_import_clip_or_torchvision():
    """train.py on a features file never encodes an image, so it must not pay their import (open_clip: 3 s a
    start); backbones.py imports open_clip when a model is first read or loaded (predict.py too: a bad command
    line is told so at once)."""
    code = ("import sys, train, predict; "
            "print(sorted(m for m in ('open_clip', 'torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
