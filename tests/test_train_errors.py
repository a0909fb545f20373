"""train.py under bad input and faults, where one command of the bad-input registry (fewshot/testing/bad_inputs.py,
run by test_bad_inputs.py: one error line with the words it must say) cannot tell it all: checks made before any
training (tripwires, each proven live), checkpoints, what a write that fails after training keeps.

Also the tests that catch a train.py that looks right but is not: the α of Tip-Adapter, the split the
search reads, leave-one-out reaching the loss, and the views an epoch draws.
"""
import dataclasses
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

import fewshot.extraction as ef
import fewshot.features as ff
import fewshot.files as files
from fewshot import cli, methods, runs, tasks, training
from fewshot.baselines import TipAdapter, TipConfig
from fewshot.testing.fixtures import synthetic_features
from hegraphadapter import HeGraphConfig


def edit(path, change, out=None):
    """A copy of a features file with change(data) applied; returns its path."""
    data = torch.load(path, weights_only=True)
    change(data)
    out = out or Path(path).with_name("edited.pt")
    torch.save(data, out)
    return out


# -----------------------------------------------------------------------------
# never a wrong number with exit 0

def test_a_small_integer_type_of_few_shot_indices_still_indexes(feats, run):
    """uint8 few-shot rows (not bool: a mask) index like int64 ones: the same accuracy as the file they came from
    (the features file's bad tensors are cases of the bad-input registry)."""
    small = edit(feats, lambda d: d["fewshot"].__setitem__(1, d["fewshot"][1].to(torch.uint8)))
    assert run("--features", small, "--method", "tip", "--shots", 2)["seeds"] == \
        run("--features", feats, "--method", "tip", "--shots", 2)["seeds"]


def test_search_val_tunes_on_the_validation_subset_only(tmp_path, run):
    """The recorded α, γ are the brute-force best on the val subset, which differs from the test's best."""
    feats = synthetic_features(tmp_path / "f.pt", C=8, text_noise=1.0, seeds=(1,))
    data = torch.load(feats, weights_only=True)
    data["val"]["features"] = data["train"]["features"][0, data["fewshot"][1][:, :1].repeat(1, 4).flatten()]
    torch.save(data, feats)                                        # val = the cache's own images: α wants to be large
    r = run("--features", feats, "--method", "tip", "--shots", 2, "--search-val", "--seeds", 1)
    chosen = r["model_config"][1]
    task = tasks.make_task(ff.load_features(feats), 1, 2, "cpu")
    # Tip-Adapter's search without a config of its own: from 0.1 up to below 10, 4 γ x 3 α (its search_hp)
    grid = [(round(0.1 + a * 9.9 / 3, 3), round(0.1 + g * 9.9 / 4, 3)) for g in range(4) for a in range(3)]

    def best(feats, labels):
        scores = []
        for i, (alpha, gamma) in enumerate(grid):
            model = TipAdapter(task.pos_text, task.cache_feats, task.train_labels, config=TipConfig(gamma=gamma))
            logits_t, logits_v = model.logits(feats)
            scores.append((((logits_t + alpha * logits_v).argmax(1) == labels).float().mean().item(), -i))
        return grid[-max(scores)[1]]
    on_val, on_test = best(*task.val), best(*task.test)
    assert on_val != on_test, "the fixture must make val and test disagree for this test to mean anything"
    assert (chosen["alpha"], chosen["gamma"]) == pytest.approx(on_val)
    assert r["search"][1]["chosen"] == {"gamma": on_val[1], "alpha": on_val[0]} and len(r["grid"]) == 12


def test_searched_checkpoints_join_one_folder_and_evaluate_as_searched(feats, tmp_path, run):
    """--search-val changes α, γ per seed: seeds of one command are still one run, and --eval-only scores
    the searched model, not the flags' α and γ."""
    ck = tmp_path / "ck"
    first = run("--features", feats, "--method", "tip-f", "--shots", 2, "--epochs", 2, "--search-val", "--seeds", 1,
                "--save", ck)
    run("--features", feats, "--method", "tip-f", "--shots", 2, "--epochs", 2, "--search-val", "--seeds", 2,
        "--save", ck)
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith(".")) == ["seed1.pt", "seed2.pt"]
    searched = torch.load(ck / "seed1.pt", weights_only=True)["model_config"]
    assert (searched["alpha"], searched["gamma"]) != (1.0, 5.0), "the search must move α or γ for this to test"
    again = run("--features", feats, "--eval-only", "--load", ck, "--seeds", 1)
    assert again["seeds"] == first["seeds"] and again["model_config"][1] == searched


def test_eval_only_takes_method_and_shots_from_the_checkpoints_and_refuses_conflicts(feats, tmp_path, run, fail):
    run("--features", feats, "--method", "hegraph-t", "--shots", 3, "--epochs", 1, "--seeds", 1, 2,
        "--save", tmp_path / "ck")
    line = fail("--features", feats, "--eval-only", "--load", tmp_path / "ck", "--method", "tip",
                "--seeds", 1, 2)
    assert "--method tip conflicts" in line and "hegraph-t" in line
    assert "--shots 2 conflicts" in fail("--features", feats, "--eval-only", "--load", tmp_path / "ck",
                                         "--shots", 2, "--seeds", 1)
    r = run("--features", feats, "--eval-only", "--load", tmp_path / "ck", "--seeds", 1, 2)
    assert (r["method"], r["shots"]) == ("hegraph-t", 3)


def test_checkpoints_of_another_config_version_are_refused_not_rebuilt_with_todays_defaults(feats, tmp_path, run, fail):
    """A checkpoint saved before a config field existed would otherwise get the field's current default."""
    ck = tmp_path / "ck"
    run("--features", feats, "--shots", 2, "--epochs", 1, "--seeds", 1, "--save", ck)
    ckpt = torch.load(ck / "seed1.pt", weights_only=True)
    del ckpt["model_config"]["weight_scale"]
    ckpt["model_config"]["old_knob"] = 1.0
    torch.save(ckpt, ck / "seed1.pt")
    line = fail("--features", feats, "--eval-only", "--load", ck, "--seeds", 1)
    assert "another version of train.py" in line and "lacks weight_scale and has the unknown old_knob" in line
    assert f"--save {ck} --overwrite" in line


def test_max_shots_defaults_to_what_the_run_asks_for(monkeypatch):
    """16 for a benchmark (one file for K 1 ... 16), more when --shots asks for more; --shots for a folder."""
    asked = []
    monkeypatch.setattr(ef, "extract", lambda settings, *a, **k: asked.append(settings.max_shots) or 1 / 0)
    for dataset, shots, expected in (("dtd", 4, 16), ("dtd", 32, 32), ("/my/images", 4, 4)):
        monkeypatch.setattr(ef, "resolve_dataset", lambda d: d)           # no folder needed to name one
        with pytest.raises(ZeroDivisionError):
            ef.Extraction().run(dataset, (1,), shots=shots)
        assert asked.pop() == expected


def test_tilde_is_expanded_in_path_flags(feats, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    request = cli.train_request(["--features", str(feats), "--out=~/r.json", "--save", "~/ck", "--features-dir=~/f"])
    assert (request.out, request.save, request.extraction.features_dir) == (tmp_path / "r.json", tmp_path / "ck",
                                                                            tmp_path / "f")


# -----------------------------------------------------------------------------
# nothing lost

def test_unwritable_outputs_are_refused_before_training(feats, tmp_path, tripwire, fail):
    wire = tripwire(training, "train", "trained before checking the outputs")
    (tmp_path / "file").write_text("")
    assert "cannot be written: " in fail("--features", feats, "--out", tmp_path / "file" / "r.json")
    assert "cannot be written: " in fail("--features", feats, "--save", tmp_path / "file" / "ck")
    wire.proven(lambda: fail("--features", feats, "--shots", 2, "--out", tmp_path / "r.json"))  # a writable one trains


def test_checkpoint_folders_are_never_mixed(feats, tmp_path, run, fail):
    ck = tmp_path / "ck"
    run("--features", feats, "--method", "hegraph", "--shots", 2, "--epochs", 1, "--seeds", 1, 3, "--save", ck)
    run("--features", feats, "--method", "hegraph", "--shots", 2, "--epochs", 1, "--seeds", 2, "--save", ck)
    assert sorted(p.name for p in ck.iterdir()) == ["seed1.pt", "seed2.pt", "seed3.pt"]   # same run: joins
    line = fail("--features", feats, "--method", "hegraph-t", "--shots", 2, "--epochs", 1, "--seeds", 1,
                "--save", ck)
    assert "another run" in line and "--overwrite" in line
    assert "another run" in fail("--features", feats, "--method", "hegraph", "--shots", 2, "--epochs", 1,
                                 "--seeds", 1, "--beta-vv", 0.5, "--save", ck)    # same method, other config
    run("--features", feats, "--method", "hegraph-t", "--shots", 2, "--epochs", 1, "--seeds", 1, "--save", ck,
        "--overwrite")
    assert sorted(p.name for p in ck.iterdir()) == ["seed1.pt"]                # the old run's seeds are gone
    # a folder whose seeds disagree (put together by hand) is refused by --eval-only
    run("--features", feats, "--method", "hegraph", "--shots", 2, "--epochs", 1, "--seeds", 2, "--save",
        tmp_path / "other")
    (tmp_path / "other" / "seed2.pt").rename(ck / "seed2.pt")
    assert "different runs" in fail("--features", feats, "--eval-only", "--load", ck, "--seeds", 1, 2)


# -----------------------------------------------------------------------------
# a train.py that looks right but is not

def test_leave_one_out_reaches_the_loss_and_views_are_drawn_at_random(feats, monkeypatch):
    """hegraph trains with exclude = each image's own cache row; every epoch draws among all stored views."""
    data = ff.load_features(feats)
    task = tasks.make_task(data, 1, 4, "cpu")
    model = methods.build(methods.METHODS["hegraph"], task, HeGraphConfig())
    calls = []
    original = model.loss
    monkeypatch.setattr(model, "loss", lambda x, y, **kw: calls.append((x, y, kw)) or original(x, y, **kw))
    recipe = methods.effective_recipe("hegraph", "synthetic", 4, {})
    training.train(model, task.train_views, task.train_labels, dataclasses.replace(recipe, epochs=4, batch_size=16),
                seed=1)
    views = task.train_views                                                  # [V, n, d]
    drawn = torch.zeros(views.shape[0], dtype=torch.long)
    for x, y, kw in calls:
        rows = kw["exclude"]                                                  # the images' own cache rows
        assert torch.equal(y, task.train_labels[rows])
        match = (x[None] == views[:, rows]).all(-1)                          # [V, b]: which view each row is
        assert match.any(0).all()
        drawn += match.long().argmax(0).bincount(minlength=views.shape[0])
    assert (drawn > 0).all(), drawn                                          # not view 0 only
    assert sum(len(y) for _, y, _ in calls) == 4 * len(task.train_labels)   # every image once per epoch


def test_tip_f_trains_without_leave_one_out(feats, monkeypatch):
    data = ff.load_features(feats)
    task = tasks.make_task(data, 1, 2, "cpu")
    model = methods.build(methods.METHODS["tip-f"], task, TipConfig(learn_keys=True))
    seen = []
    original = model.loss
    monkeypatch.setattr(model, "loss", lambda x, y, **kw: seen.append(kw) or original(x, y, **kw))
    recipe = methods.effective_recipe("tip-f", "synthetic", 2, {})
    training.train(model, task.train_views, task.train_labels, dataclasses.replace(recipe, epochs=1), seed=1)
    assert seen and all(kw == {} for kw in seen)


def test_tip_uses_alpha(feats, run):
    """--alpha changes Tip-Adapter's prediction, and --alpha 0 is zero-shot."""
    zs = run("--features", feats, "--method", "zeroshot", "--shots", 2)["seeds"]
    assert run("--features", feats, "--method", "tip", "--shots", 2, "--alpha", 0)["seeds"] == zs
    assert run("--features", feats, "--method", "tip", "--shots", 2, "--alpha", 3)["seeds"] != zs


def test_results_json_holds_only_what_was_evaluated(feats, tmp_path, run):
    out = tmp_path / "r.json"
    run("--features", feats, "--method", "tip", "--shots", 2, "--epochs", 7, "--out", out)
    r = json.loads(out.read_text())
    assert r["recipe"] is None and r["params"] == 0                            # tip trains nothing: no epochs


def test_every_number_a_flag_feeds_has_a_range():
    """RANGES is the one table: a config field or flag without a row would enter its formula unchecked."""
    from fewshot.ranges import RANGES
    numbers = {name for name, (kind, _) in methods.config_fields().items() if kind in (int, float)}
    assert numbers <= set(RANGES), numbers - set(RANGES)
    assert {"shots", "epochs", "lr", "batch_size"} <= set(RANGES)


def test_an_unforeseen_error_is_one_line_with_the_path_of_its_traceback(feats, monkeypatch, fail):
    def broken(*args, **kwargs):
        raise KeyError("a bug of ours")
    monkeypatch.setattr(runs, "make_plan", broken)
    line = fail("--features", feats)
    assert "unexpected KeyError" in line and "this is a bug" in line
    log = Path(line.split("traceback is in ")[1].split(",")[0])
    assert "Traceback" in log.read_text() and "a bug of ours" in log.read_text()
    log.unlink()


@pytest.mark.parametrize("spoil, words", [
    (lambda c: c["state_dict"]["b_p"].__setitem__((0, 0), float("nan")), "'b_p' is not a tensor of finite numbers"),
    (lambda c: c["state_dict"].__setitem__("b_p", c["state_dict"]["b_p"][:, :5]), "does not fit this HeGraphAdapter"),
    (lambda c: c["state_dict"].__setitem__("extra", torch.zeros(3)), "does not fit this HeGraphAdapter"),
    (lambda c: c["state_dict"].pop("W_p"), "does not fit this HeGraphAdapter"),
    (lambda c: c["model_config"].__setitem__("alpha", float("nan")), "holds alpha = nan, which must be at least 0"),
    (lambda c: c["run"].pop("classnames_sha256"), "'classnames_sha256' is None, not a str"),
    (lambda c: c.__setitem__("state_dict", list(c["state_dict"].values())), "its 'state_dict' is a list, not a dict"),
    (lambda c: c["model_config"].__setitem__("variant", "t"), "its variant is 't', and a hegraph model's is 'full'"),
    (lambda c: c["cache"].__setitem__("labels", c["cache"]["labels"] + 100), "cache.labels must be 20 class indices"),
    (lambda c: c.__setitem__("format", "hegraphadapter-model-v0"), "not a model file of format"),
])
def test_a_spoiled_checkpoint_gets_one_line_not_a_number(feats, tmp_path, spoil, words, run, fail):
    run("--features", feats, "--shots", 2, "--epochs", 1, "--seeds", 1, "--save", tmp_path / "ck")
    path = tmp_path / "ck" / "seed1.pt"
    ckpt = torch.load(path, weights_only=True)
    spoil(ckpt)
    torch.save(ckpt, path)
    line = fail("--features", feats, "--eval-only", "--load", tmp_path / "ck", "--seeds", 1)
    assert words in line and str(path) in line and f"--save {tmp_path / 'ck'} --overwrite" in line


def test_a_checkpoint_of_another_dataset_with_the_same_shapes_is_refused(feats, tmp_path, run, fail):
    run("--features", feats, "--shots", 2, "--epochs", 1, "--seeds", 1, "--save", tmp_path / "ck")
    renamed = edit(feats, lambda d: d.__setitem__("classnames", [f"other {c}" for c in d["classnames"]]))
    assert "with other classes than the features" in fail("--features", renamed, "--eval-only", "--load",
                                                         tmp_path / "ck", "--seeds", 1)


# -----------------------------------------------------------------------------
# outputs never destroy inputs

def test_outputs_that_are_inputs_are_refused_before_any_work(feats, tmp_path, tripwire, fail, make_dataset):
    wire = tripwire(training, "train", "trained before checking the outputs")
    stamp = Path(feats).read_bytes()
    assert "is the --features file" in fail("--features", feats, "--out", feats)
    (tmp_path / "link.pt").symlink_to(feats)
    assert "is the --features file" in fail("--features", feats, "--out", tmp_path / "link.pt")
    assert "is the --save model file of seed 1" in fail("--features", feats, "--save", tmp_path / "ck",
                                                       "--out", tmp_path / "ck" / "seed1.pt", "--seeds", 1)
    root = make_dataset("dtd")
    assert "is the dataset folder" in fail("--dataset", "dtd", "--root", root, "--out", root / "dtd" / "r.json")
    assert Path(feats).read_bytes() == stamp
    wire.proven(lambda: fail("--features", feats, "--shots", 2, "--out", tmp_path / "elsewhere.json"))


def test_a_name_too_long_or_a_full_disk_is_refused_before_training(feats, tmp_path, monkeypatch, tripwire, fail):
    wire = tripwire(training, "train", "trained before checking the outputs")
    assert "the name is too long" in fail("--features", feats, "--out", tmp_path / ("r" * 250 + ".json"))
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
        assert "free on its disk" in fail("--features", feats, "--out", tmp_path / "r.json")
    wire.proven(lambda: fail("--features", feats, "--shots", 2, "--out", tmp_path / "r.json"))  # room: it trains


def test_a_write_that_fails_after_training_keeps_the_numbers(feats, tmp_path, monkeypatch, capsys):
    def disk_full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(files, "write_atomic", disk_full)
    with pytest.raises(SystemExit):
        cli.train_command(["--features", str(feats), "--shots", "2", "--epochs", "1", "--seeds", "1",
                    "--out", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert "mean" in out and "results are printed above" in err and "No space left" in err
    assert not (tmp_path / "r.json").exists()


def test_an_unreadable_features_file_names_its_permissions(feats, fail, monkeypatch):
    """(As root every file is readable, so the file system's refusal is played by torch.load.)"""
    def refused(path, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(torch, "load", refused)
    line = fail("--features", feats)
    assert "cannot read features file" in line and "Permission denied; check its permissions" in line


def test_a_tripwire_on_a_name_the_code_does_not_call_cannot_be_proven(feats, tripwire, run):
    """The tests' tripwires prove themselves: one the command never reaches fails its proof (tip trains nothing,
    so it never makes an optimizer); tip-f does."""
    wire = tripwire(training, "make_optimizer", "made an optimizer")
    with pytest.raises(AssertionError, match="never fired"):
        wire.proven(lambda: run("--features", feats, "--method", "tip", "--shots", 2))
    wire.proven(lambda: run("--features", feats, "--method", "tip-f", "--shots", 2, "--epochs", 1, "--seeds", 1))
