"""CoOp (fewshot/coop.py) on the tiny random CLIPs: from "a photo of a" it is zero-shot CLIP; only its context
learns, every CLIP weight stays as it was and none is saved; a step lowers the loss; the class-specific variant
has C x M context vectors; its recipe is CoOp's; train.py runs it end to end, and a run of any other method never
loads a CLIP."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fewshot import backbones, classify, coop, extraction, methods, pace, report, training
from fewshot.baselines import ZeroShot
from fewshot.features import Settings, load_features

CPU = torch.device("cpu")
NAMES = ["class a_0", "red panda", "snow-leopard", "a_b_c"]   # underscores: CoOp reads them as spaces


def load(settings):
    encoder = backbones.load(backbones.resolve(settings), CPU)
    return encoder, coop.TextEncoder(encoder.model, encoder.tokenize)


@pytest.fixture(scope="module", params=["openai-checkpoint", "open_clip-folder"])
def clip(request, tiny_vit_checkpoint, tiny_open_clip_dir):
    """(open_clip Encoder, coop.TextEncoder) of each tiny CLIP: OpenAI's format (context 77, d = 32) and an
    open_clip folder (context 32, d = 24)."""
    if request.param == "openai-checkpoint":
        return load(Settings("", clip_checkpoint=str(tiny_vit_checkpoint)))
    return load(Settings("", backbone=f"local-dir:{tiny_open_clip_dir}"))


def zero_shot_text(encoder, template="a photo of a {}."):
    """The project's own zero-shot text features of NAMES (float16, as a features file holds them) and the
    float32 ones of open_clip's encode_text over the whole context."""
    sentences = [template.format(name.replace("_", " ")) for name in NAMES]
    stored = extraction.encode_text(encoder, [[s] for s in sentences], pace.Pace(text_batch_size=8), CPU).float()
    with torch.no_grad():
        full = F.normalize(encoder.model.encode_text(encoder.tokenize(sentences)), dim=-1)     # [C, d]
    return stored, full


def test_from_a_photo_of_a_coop_is_zero_shot_clip(clip):
    encoder, text = clip
    model = coop.CoOp(text, NAMES, config=coop.CoOpConfig(coop_init=True), logit_scale=100.0).eval()
    assert model.config.n_ctx == 4 and model.ctx.shape == (4, text.width)     # the words' 4 tokens, recorded
    stored, full = zero_shot_text(encoder)
    images = F.normalize(torch.randn(50, stored.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        ours = model(images)                                                  # [50, C]
        assert torch.allclose(F.normalize(model.classifier(), dim=-1), full, atol=1e-5)   # cut prompts: exact
    theirs = ZeroShot(stored, logit_scale=100.0)(images)
    assert torch.allclose(ours, theirs, atol=0.1)                      # float16 text features: 100 x 1e-3
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() > 0.95
    # the cut is where the longest prompt ends, shorter than the context
    assert model.token_prefix.shape[1] + 4 + model.token_suffix.shape[1] < text.positional_embedding.shape[0]


def separable(encoder, per_class=8):
    """Images of each class near its zero-shot text feature: a task a classifier of the text can separate."""
    stored, _ = zero_shot_text(encoder)
    labels = torch.arange(len(NAMES)).repeat_interleave(per_class)
    noise = 0.05 * torch.randn(len(labels), stored.shape[1], generator=torch.Generator().manual_seed(1))
    return F.normalize(stored[labels] + noise, dim=-1), labels


@pytest.mark.parametrize("csc", [False, True])
def test_only_the_context_learns_and_clip_never_changes(clip, csc):
    encoder, text = clip
    clip_before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    torch.manual_seed(0)
    model = coop.CoOp(text, NAMES, config=coop.CoOpConfig(n_ctx=6, csc=csc), logit_scale=100.0)
    C, w = len(NAMES), text.width
    assert model.ctx.shape == ((C, 6, w) if csc else (6, w))                  # C x M vectors with CSC
    assert [name for name, _ in model.named_parameters()] == ["ctx"] and list(model.state_dict()) == ["ctx"]
    assert training.tunable_parameters(model) == (C if csc else 1) * 6 * w
    assert all(not p.requires_grad for p in encoder.model.parameters())
    assert 0.015 < model.ctx.std().item() < 0.025                            # N(0, 0.02^2)
    images, labels = separable(encoder)
    # one step of CoOp's optimizer lowers the loss, and the gradient reached the context only. The lr is the
    # test's: a random tiny CLIP's text features are far more sensitive to the context than a trained one's
    recipe = dataclasses.replace(methods.effective_recipe("coop", "dtd", 1, {}), lr=1e-4, epochs=20, batch_size=16)
    optimizer = training.make_optimizer([model.ctx], recipe)
    model.train()
    loss = model.loss(images, labels)
    loss.backward()
    assert model.ctx.grad.abs().sum() > 0 and all(p.grad is None for p in encoder.model.parameters())
    optimizer.step()
    assert model.loss(images, labels).item() < loss.item()
    # training with CoOp's loop: the loss falls further and the context separates the classes
    start = model.ctx.detach().clone()
    training.train(model, images[None], labels, recipe, 1)
    model.train()
    assert model.loss(images, labels).item() < 0.8 * loss.item() and not torch.equal(model.ctx, start)
    assert training.accuracy(model, images, labels) >= 80
    if csc:
        assert not torch.allclose(model.ctx[0], model.ctx[1])              # each class its own context
    after = encoder.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in clip_before.items())


def test_the_evaluation_cache_follows_the_context(clip):
    """In evaluation the text features are computed once, and again after the context changes."""
    _, text = clip
    model = coop.CoOp(text, NAMES, logit_scale=100.0).eval()
    images = torch.randn(3, text.text_projection.shape[-1])
    with torch.no_grad():
        first = model(images)
        model.ctx.add_(torch.randn_like(model.ctx))             # in place, as an optimizer step
        assert not torch.allclose(model(images), first)


def test_coops_recipe_and_knobs():
    """CoOp's configs: SGD lr 0.002, batch 32, L2 5e-4, a constant 1e-5 warm-up epoch; 50 / 100 / 200 epochs
    by K, ImageNet 50 at every K; the knobs: CSC x lr, within the budget."""
    epochs = {k: methods.effective_recipe("coop", "dtd", k, {}).epochs for k in (1, 2, 4, 8, 16)}
    assert epochs == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
    assert {methods.effective_recipe("coop", "imagenet", k, {}).epochs for k in (1, 4, 16)} == {50}
    r = methods.effective_recipe("coop", "dtd", 16, {})
    assert (r.optimizer, r.lr, r.batch_size, r.weight_decay, r.warmup, r.constant_warmup) == \
        ("sgd", 2e-3, 32, 5e-4, True, True)
    lrs = [training.schedule(s, 10, 100, r.lr, constant_warmup=True) for s in range(100)]
    assert lrs[:10] == [methods.WARMUP_LR] * 10 and lrs[10] == pytest.approx(r.lr)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    points = methods.grid(methods.METHODS["coop"], "dtd", r)
    assert len(points) == 8 and {p["csc"] for p in points} == {False, True}
    assert methods.METHODS["coop"].text_encoder
    assert not any(m.text_encoder for name, m in methods.METHODS.items() if name != "coop")


@pytest.fixture(scope="module")
def dtd(make_dataset, tiny_vit_checkpoint):
    """A dtd dataset and the common flags of a tiny run on it (features extracted by the first run)."""
    root = make_dataset("dtd")
    return ["--dataset", "dtd", "--root", root, "--clip-checkpoint", tiny_vit_checkpoint, "--workers", 0,
            "--device", "cpu", "--max-shots", 2, "--views", 2]


def test_train_py_runs_coop_end_to_end_and_saves_the_context_only(dtd, run, tmp_path):
    r = run(*dtd, "--method", "coop", "--shots", 2, "--seeds", 1, 2, "--epochs", 3, "--save", tmp_path / "ck")
    assert r["method"] == "coop" and r["params"] == 16 * 64 and set(r["seeds"]) == {1, 2}
    assert r["recipe"]["constant_warmup"] and r["model_config"][1] == {"n_ctx": 16, "csc": False, "coop_init": False}
    saved = torch.load(tmp_path / "ck" / "seed1.pt", weights_only=True)
    assert list(saved["state_dict"]) == ["ctx"]                              # no CLIP weight in the checkpoint
    again = run(*dtd, "--seeds", 1, 2, "--eval-only", "--load", tmp_path / "ck")
    assert again["method"] == "coop" and again["seeds"] == r["seeds"]
    # predict.py's classifier rebuilds it from its model file and the CLIP (whose text tower makes its classes'
    # features): the test images, read from disk, get --eval-only's accuracy
    data = load_features(next(Path("features").glob("dtd_*.pt")))
    images = [dtd[3] / "dtd" / "images" / p for p in data["paths"]["test"]]
    probs = classify.load_classifier(tmp_path / "ck", seed=1).predict(images)
    assert 100.0 * (probs.argmax(1) == data["test"]["labels"]).sum().item() / len(images) == again["seeds"][1]
    init = run(*dtd, "--method", "coop", "--shots", 2, "--seeds", 1, "--epochs", 0, "--coop-init", "--csc")
    assert init["model_config"][1] == {"n_ctx": 4, "csc": True, "coop_init": True} and init["params"] == 3 * 4 * 64
    searched = run(*dtd, "--method", "coop", "--shots", 2, "--seeds", 1, "--epochs", 1, "--search-val")
    chosen, config = searched["search"][1]["chosen"], searched["model_config"][1]
    assert searched["grid"] == methods.grid(methods.METHODS["coop"], "dtd", methods.effective_recipe(
        "coop", "dtd", 2, {"epochs": 1})) and chosen in searched["grid"] and config["csc"] == chosen["csc"]


def test_other_methods_never_import_or_load_a_clip(dtd, run, monkeypatch, tmp_path):
    run(*dtd, "--method", "zeroshot", "--shots", 2, "--seeds", 1)              # extracts the features
    [features] = Path("features").glob("dtd_*.pt")

    def refuse(*args, **kwargs):
        raise AssertionError("a CLIP was imported or loaded")
    monkeypatch.setattr(backbones, "import_open_clip", refuse)
    monkeypatch.setattr(backbones, "load", refuse)
    for method in ("zeroshot", "hegraph", "tip-f"):
        run("--features", features, "--method", method, "--shots", 2, "--seeds", 1, "--epochs", 1)
    with pytest.raises(AssertionError, match="a CLIP was"):
        run("--features", features, "--method", "coop", "--shots", 2, "--seeds", 1, "--epochs", 1)
    assert load_features(features)["settings"]["clip_checkpoint"]


def test_the_sweep_runs_coop_and_the_report_shows_it(make_dataset, tiny_vit_checkpoint, tmp_path):
    from test_reproduce import main, markdown_cells, ran, sweep_argv

    from fewshot import sweep
    assert "coop" in sweep.parse_args(["--datasets", "dtd"])[0].methods      # every row by default
    argv = sweep_argv(make_dataset("dtd"), tiny_vit_checkpoint, tmp_path / "features", tmp_path / "results",
                      datasets=["dtd"], methods=["zeroshot", "coop"], shots=[1], seeds=[1, 2], epochs=1)
    [run_file] = [name for name in ran(main(argv)) if "_coop_" in name]
    r = json.loads((tmp_path / "results" / "runs" / run_file).read_text())
    cells = markdown_cells((tmp_path / "results" / "README.md").read_text())
    assert cells[("K = 1", "`coop`", "DTD")] == report.fmt(list(r["seeds"].values()))
    assert cells[("Cost", "`coop`", "tunable parameters")] == f"{16 * 64:,}"


def test_the_report_puts_our_coop_beside_the_papers(tmp_path):
    """RN50, 16 shots: the paper's CoOp row (Table 2, and Table 1 for the shift sets) and Δ = ours − paper."""
    from test_reproduce import fake_run, markdown_cells
    fake_run(tmp_path, "dtd", "coop", 16, {"1": 60.0, "2": 62.0})
    fake_run(tmp_path, "imagenet", "coop", 16, {"1": 62.0, "2": 63.0},
             shift={"imagenetv2": {"1": 55.0, "2": 55.0}, "imagenet-sketch": {"1": 33.0, "2": 33.0},
                    "imagenet-adversarial": {"1": 22.0, "2": 22.0}, "imagenet-rendition": {"1": 55.0, "2": 55.0}})
    report.write_report(tmp_path)
    cells = markdown_cells((tmp_path / "README.md").read_text())
    assert cells[("K = 16", "paper: CoOp", "DTD")] == "63.58" and cells[("K = 16", "Δ `coop`", "DTD")] == "-2.58"
    shift = "C. Domain generalisation (RN50, ImageNet K = 16 → shift sets)"
    assert cells[(shift, "paper: CoOp", "-V2")] == "55.11" and cells[(shift, "Δ `coop`", "-V2")] == "-0.11"
