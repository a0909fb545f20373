"""The training protocol, checked where a train.py that looks right would get it wrong: what train() sees, the
warm-up, the seeded draws, the shuffling, the spread over seeds, the validation subset, the published
per-dataset settings and the linear probe's tie-break."""
import dataclasses
import inspect
import statistics

import pytest
import torch
import torch.nn.functional as F

import fewshot.features as ff
from fewshot import methods, tasks, training
from fewshot.baselines import LinearProbe, fit_linear_probe
from fewshot.testing.fixtures import synthetic_features
from hegraphadapter import HeGraphConfig


def spied_training(feats, monkeypatch, seed, epochs=3, batch_size=16, method="hegraph", **recipe):
    """train() of a method on the 4-shot task of seed 1: the rows of each batch (as cache rows) and the learning
    rate of each step."""
    task = tasks.make_task(ff.load_features(feats), 1, 4, "cpu")
    row = methods.METHODS[method]
    model = methods.build(row, task, row.config("synthetic"))
    batches, lrs = [], []
    original = model.loss
    monkeypatch.setattr(model, "loss",
                        lambda x, y, **kw: batches.append(kw["exclude"].tolist()) or original(x, y, **kw))
    make = training.make_optimizer

    def recording(params, r):
        opt = make(params, r)
        opt.register_step_pre_hook(lambda o, args, kwargs: lrs.append(o.param_groups[0]["lr"]))
        return opt
    monkeypatch.setattr(training, "make_optimizer", recording)
    base = methods.effective_recipe(method, "synthetic", 4, {})
    r = dataclasses.replace(base, epochs=epochs, batch_size=batch_size, leave_one_out=True, **recipe)
    training.train(model, task.train_views, task.train_labels, r, seed)
    return task, batches, lrs, r


def test_train_sees_the_training_views_labels_recipe_and_seed_only():
    """No epoch can be chosen on test images: train() has no way to reach them."""
    assert list(inspect.signature(training.train).parameters) == ["model", "views", "labels", "recipe", "seed", "desc"]


def test_the_test_split_is_scored_once_per_seed_after_training(feats, monkeypatch, run):
    """Not once per epoch (a best-epoch pick would have to score every epoch)."""
    calls = []
    original = training.predictions
    monkeypatch.setattr(training, "predictions",
                        lambda model, f, *a, **kw: calls.append(len(f)) or original(model, f, *a, **kw))
    run("--features", feats, "--shots", 2, "--epochs", 5, "--seeds", 1, 2)
    test_size = len(torch.load(feats, weights_only=True)["test"]["labels"])
    assert calls == [test_size, test_size]


def test_the_warm_up_epoch_rises_from_1e5_then_the_cosine_decays(feats, monkeypatch):
    task, batches, lrs, recipe = spied_training(feats, monkeypatch, seed=1)
    per_epoch = len(batches) // recipe.epochs
    assert lrs[0] == pytest.approx(methods.WARMUP_LR)
    rising = lrs[:per_epoch + 1]
    assert all(a < b for a, b in zip(rising, rising[1:])) and lrs[per_epoch] == pytest.approx(recipe.lr)
    assert all(a >= b for a, b in zip(lrs[per_epoch:], lrs[per_epoch + 1:]))
    _, _, lrs, recipe = spied_training(feats, monkeypatch, seed=1, warmup=False)
    assert lrs[0] == pytest.approx(recipe.lr)                                # no warm-up: the peak at once


def test_batches_are_shuffled_not_class_sorted(feats, monkeypatch):
    task, batches, _, recipe = spied_training(feats, monkeypatch, seed=1)
    per_epoch = len(batches) // recipe.epochs
    epoch = [row for batch in batches[:per_epoch] for row in batch]
    assert sorted(epoch) == list(range(len(task.train_labels)))               # every image once per epoch
    assert epoch != sorted(epoch)
    classes_per_batch = [len(set(task.train_labels[b].tolist())) for b in batches[:per_epoch]]
    assert min(classes_per_batch) > 2                                        # 16 images: 4 classes if sorted
    second = [row for batch in batches[per_epoch:2 * per_epoch] for row in batch]
    assert second != epoch                                                    # a new order every epoch


def test_the_draws_follow_the_seed(feats, monkeypatch):
    """The batch order and view draws come from a generator seeded by the run's seed: the same seed draws the
    same, another seed draws otherwise."""
    _, one, _, _ = spied_training(feats, monkeypatch, seed=1)
    _, again, _, _ = spied_training(feats, monkeypatch, seed=1)
    _, two, _, _ = spied_training(feats, monkeypatch, seed=2)
    assert one == again and one != two


def test_the_spread_over_seeds_is_the_sample_standard_deviation(feats, run):
    r = run("--features", feats, "--shots", 1, "--seeds", 1, 2, 3, "--epochs", 3, "--lr", 0.03)
    accs = list(r["seeds"].values())
    assert len(set(accs)) > 1, "the seeds must differ for this test to mean anything"
    assert r["std"] == pytest.approx(statistics.stdev(accs)) and r["std"] != pytest.approx(statistics.pstdev(accs))


def test_validation_uses_min_k_4_images_per_class(tmp_path):
    feats = synthetic_features(tmp_path / "f.pt", C=5, max_shots=4)           # val_fewshot: 4 columns
    data = ff.load_features(feats)
    for shots, per_class in ((1, 1), (2, 2), (4, 4)):
        task = tasks.make_task(data, 1, shots, "cpu")
        assert torch.equal(task.val[1].bincount(minlength=5), torch.full((5,), per_class))
        assert torch.equal(task.val[0],
                           data["val"]["features"][data["val_fewshot"][1][:, :per_class].flatten()].float())


@pytest.mark.parametrize("dataset, scale", [("oxford_flowers", 1.0), ("imagenet", 0.5), ("dtd", 0.5)])
def test_taskres_takes_its_published_scale_per_dataset(dataset, scale):
    assert methods.METHODS["taskres"].config(dataset).scale == scale


def test_tip_adapter_starts_from_its_released_configs():
    """configs/<dataset>.yaml: init_alpha per dataset, init_beta (our γ) 1; the search range up to search_scale."""
    cfg = methods.METHODS["tip"].config
    assert (cfg("oxford_flowers").alpha, cfg("imagenet").alpha, cfg("fgvc_aircraft").alpha) == (10, 1.17, 5)
    assert cfg("dtd").gamma == 1.0 and methods.METHODS["tip-f"].config("dtd").learn_keys



@pytest.mark.parametrize("method", ["tip", "tip-f"])
def test_tip_adapter_searches_from_the_low_end_of_its_range(method):
    """Tip-Adapter's utils.py search_hp: beta_list = [i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in
    range(search_step[0])], alpha_list likewise: from 0.1 up to below search_scale, here with 4 γ x 3 α steps."""
    for dataset, (gamma_max, alpha_max) in (("imagenet", (7, 3)), ("oxford_flowers", (50, 50)), ("mine", (10, 10))):
        knobs = methods.METHODS[method].knobs(dataset, methods.effective_recipe(method, dataset, 4, {}))
        assert set(knobs) == {"gamma", "alpha"}
        assert knobs["gamma"] == pytest.approx([i * (gamma_max - 0.1) / 4 + 0.1 for i in range(4)], abs=1e-3)
        assert knobs["alpha"] == pytest.approx([i * (alpha_max - 0.1) / 3 + 0.1 for i in range(3)], abs=1e-3)
        assert min(knobs["gamma"]) == min(knobs["alpha"]) == 0.1 and max(knobs["gamma"]) < gamma_max


def test_the_linear_probe_keeps_the_stronger_l2_among_equal_validation_scores():
    """Separable classes: every C scores 100 % on val, so the tie-break alone decides: the smallest C of its grid
    (its knob, searched by --search-val like every method's)."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    labels = torch.arange(3).repeat_interleave(4)
    feats = F.normalize(centres[labels] + 0.01 * torch.randn(12, 8, generator=g), dim=-1)
    task = tasks.Task(centres, None, feats[None], labels, feats, (feats, labels), (feats, labels), 100.0)
    row = methods.METHODS["linear-probe"]
    points = methods.grid(row, "mine", None)
    model, info, searched = training.search(row, task, row.config("mine"), None, points, 1)
    assert searched["val_accuracy"] == 100.0 and [p["inverse_l2"] for p in points] == sorted(methods.PROBE_C)
    assert searched["chosen"]["inverse_l2"] == info["inverse_l2"] == min(methods.PROBE_C) == model.config.inverse_l2


def test_a_linear_probe_without_search_fits_the_configs_c():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    labels = torch.arange(3).repeat_interleave(4)
    feats = F.normalize(centres[labels] + 0.01 * torch.randn(12, 8, generator=g), dim=-1)
    assert fit_linear_probe(LinearProbe(centres), feats, labels) == 0.316


def test_every_method_with_knobs_fits_the_budget_and_searches_on_val(feats, run):
    """--search-val works for every row with knobs, within 12 points, and records each seed's choice and the
    recipe it trained with."""
    moved_lr = []
    for name, method in methods.METHODS.items():
        recipe = methods.effective_recipe(name, "synthetic", 2, {})
        points = methods.grid(method, "synthetic", recipe)
        assert len(points) <= 12
        if not points or method.text_encoder:   # coop needs a CLIP's features: searched in tests/test_coop.py
            continue
        flags = ["--no-negatives"] if method.negatives == "optional" else []
        r = run("--features", feats, "--method", name, "--shots", 2, "--epochs", 1, "--seeds", 1, "--search-val",
                *flags)
        chosen = r["search"][1]["chosen"]
        assert chosen in points and r["grid"] == points
        config = r["model_config"][1]
        assert all(config[k] == v for k, v in chosen.items() if k != "lr")
        # the recorded recipe of the seed is the one it trained with: the search's learning rate, if it chose one
        effective = r["effective_recipe"][1]
        assert (effective is None) == (recipe is None)
        if effective is not None:
            assert effective == {**r["recipe"], "lr": chosen.get("lr", recipe.lr)}
        moved_lr.append(effective is not None and effective["lr"] != r["recipe"]["lr"])
    assert any(moved_lr), "a search must choose another learning rate than the published one for this to test"


def test_hegraph_config_flags_reach_the_model(feats, run):
    r = run("--features", feats, "--shots", 2, "--epochs", 1, "--seeds", 1, "--bias-scale", 0.3)
    assert r["model_config"][1]["bias_scale"] == 0.3 == HeGraphConfig(bias_scale=0.3).bias_scale
