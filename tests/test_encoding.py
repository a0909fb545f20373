"""How the encoder runs (fewshot/pace.py, docs/speed.md): a lower precision only where its features match fp32's on a
check batch, else fp32 with one note; the precision recorded in the file and compared on reuse as part of the view
recipe; channels-last only for convolutional towers, changing no feature; batch sizes and workers per device and
backbone."""
import pytest
import torch
import torch.nn.functional as F

import fewshot.extraction as ef
import fewshot.features as ff
from fewshot import backbones, pace
from fewshot.datasets import load_splits
from fewshot.errors import DataError

CPU = torch.device("cpu")


def encoder_of(checkpoint) -> backbones.Encoder:
    return backbones.load(backbones.resolve(ff.Settings("dtd", clip_checkpoint=str(checkpoint))), CPU)


def check_of(encoder, root):
    """The check batch an extraction of dtd under root takes."""
    splits = load_splits("dtd", root)
    return ef.check_batch(encoder, splits.images, [p for p, _ in splits.test + splits.train],
                          [f"{c} texture." for c in splits.classnames])


def test_a_lower_precision_is_adopted_where_it_matches_and_else_fp32_once(make_dataset, tiny_vit_checkpoint, capsys):
    encoder = encoder_of(tiny_vit_checkpoint)
    check = check_of(encoder, make_dataset("dtd"))
    images, tokens = check
    assert images.shape == (pace.CHECK, 3, 32, 32) and tokens.shape == (3, 77)  # 16 of 25 images, the 3 sentences
    capsys.readouterr()
    assert pace.choose_precision(encoder, "bf16", CPU, check) == "bf16"
    assert capsys.readouterr().out.startswith("encoding at bf16: its features match fp32's to cosine 0.999")
    bf16, fp32 = (pace.image_features(encoder, images, p, CPU) for p in ("bf16", "fp32"))
    assert not torch.equal(bf16, fp32) and F.cosine_similarity(bf16, fp32).min() >= pace.MATCH  # autocast ran
    # fp16 overflows where fp32 does not (patch embeddings above 65504, normalised away by ln_pre in fp32): its
    # features are NaN, and fp32 is kept, said in one line
    encoder.model.visual.conv1.weight.data *= 1e5
    assert pace.image_features(encoder, images, "fp16", CPU).isnan().any()
    assert not pace.image_features(encoder, images, "fp32", CPU).isnan().any()
    capsys.readouterr()
    assert pace.choose_precision(encoder, "fp16", CPU, check) == "fp32"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("note: fp16 features match fp32's only to cosine") and \
        out[0].endswith("encoding at fp32"), out
    assert pace.choose_precision(encoder, "fp32", CPU, check) == "fp32" and capsys.readouterr().out == ""


def test_channels_last_for_convolutional_towers_only_and_it_changes_no_feature(
        tiny_resnet_checkpoint, tiny_vit_checkpoint, tiny_open_clip_dir):
    resnet = encoder_of(tiny_resnet_checkpoint)
    assert resnet.channels_last and resnet.model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not encoder_of(tiny_vit_checkpoint).channels_last
    native = backbones.load(backbones.resolve(ff.Settings("dtd", f"local-dir:{tiny_open_clip_dir}")), CPU)
    assert not native.channels_last
    assert not any(p.requires_grad for p in resnet.model.parameters()) and not resnet.model.training
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    last = pace.image_features(resnet, x, "fp32", CPU)
    resnet.model.visual.to(memory_format=torch.contiguous_format)
    plain = pace.image_features(backbones.Encoder(resnet.model, resnet.tokenize, resnet.preprocess, resnet.transform),
                                x, "fp32", CPU)
    assert F.cosine_similarity(last, plain).min() > 0.999999          # the same arithmetic, in another order


def test_the_pace_follows_the_device_and_the_backbone(tiny_resnet_checkpoint, tiny_vit_checkpoint, monkeypatch):
    gpu = torch.device("cuda")  # the choices only; nothing runs on it
    assert pace.fast_precision(gpu) == "fp16" and pace.fast_precision(torch.device("mps")) == "fp32"
    monkeypatch.setattr(pace, "native_bf16", lambda: False)
    assert pace.fast_precision(CPU) == "fp32"                         # emulated bf16 is slower than fp32
    monkeypatch.setattr(pace, "native_bf16", lambda: True)
    assert pace.fast_precision(CPU) == "bf16"
    monkeypatch.setattr(pace, "cpu_cores", lambda: 16)
    assert (pace.default_workers(CPU), pace.default_workers(gpu)) == (2, 8)
    monkeypatch.setattr(pace, "cpu_cores", lambda: 2)
    assert (pace.default_workers(CPU), pace.default_workers(gpu)) == (1, 2)
    resnet, vit = encoder_of(tiny_resnet_checkpoint), encoder_of(tiny_vit_checkpoint)
    assert pace.choose_pace(resnet, "fp32", None, None, CPU) == pace.Pace("fp32", 16, 32, 1)
    assert pace.choose_pace(vit, "fp32", None, None, CPU) == pace.Pace("fp32", 32, 32, 1)
    assert pace.choose_pace(vit, "bf16", None, None, CPU) == pace.Pace("bf16", 128, 128, 1)
    assert pace.choose_pace(vit, "fp16", None, None, gpu) == pace.Pace("fp16", 256, 256, 2)
    assert pace.choose_pace(resnet, "bf16", 40, 0, CPU) == pace.Pace("bf16", 40, 40, 0)  # as asked


@pytest.fixture
def extract(make_dataset, tiny_vit_checkpoint, monkeypatch):
    """extract() of a tiny dtd into a folder, on a CPU taken to have bf16 in hardware (as this one may not)."""
    monkeypatch.setattr(pace, "fast_precision", lambda device: "bf16")
    root = make_dataset("dtd")

    def run(out, seeds=(1,), **kw):
        settings = ff.Settings("dtd", clip_checkpoint=str(tiny_vit_checkpoint), seeds=seeds, max_shots=2, views=2,
                               **kw)
        return ef.extract(settings, root, out, workers=0, device="cpu")
    return run


def test_the_file_records_the_precision_used_and_reuse_compares_it(extract, tmp_path, capsys):
    path = extract(tmp_path / "a").path                               # auto: bf16, where it matches
    bf16 = torch.load(path, weights_only=True)
    assert bf16["settings"]["precision"] == bf16["identity"]["recipe"]["precision"] == "bf16"
    assert bf16["encoding"] == dict(precision="bf16", batch_size=128, text_batch_size=128, workers=0,
                                    threads=torch.get_num_threads(), channels_last=False, device="cpu")
    fp32 = torch.load(extract(tmp_path / "b", precision="fp32").path, weights_only=True)
    assert fp32["identity"]["recipe"]["precision"] == "fp32" and fp32["encoding"]["batch_size"] == 32
    for key in ("test", "val", "train"):   # beyond the check batch too, the promise holds
        assert F.cosine_similarity(bf16[key]["features"].float(), fp32[key]["features"].float(), dim=-1).min() \
            >= pace.MATCH, key
    assert F.cosine_similarity(bf16["text"]["positive"].float(), fp32["text"]["positive"].float()).min() >= pace.MATCH
    with pytest.raises(DataError, match="precision: 'bf16' in the file, 'fp32' asked"):
        extract(tmp_path / "a", precision="fp32")                     # a bf16 file never serves fp32
    capsys.readouterr()
    assert extract(tmp_path / "a", precision="bf16").path == path and "reusing" in capsys.readouterr().out
    assert extract(tmp_path / "b").path.parent == tmp_path / "b" and "reusing" in capsys.readouterr().out  # auto
    # auto grows a file at the file's own precision, never mixing two in one file
    grown = torch.load(extract(tmp_path / "b", seeds=(1, 2)).path, weights_only=True)
    assert grown["identity"]["recipe"]["precision"] == "fp32" and grown["settings"]["seeds"] == [1, 2]
    # a file from before the precision was recorded was encoded in float32: fp32 and auto take it, bf16 does not
    old = torch.load(path.parent.parent / "b" / path.name, weights_only=True)
    del old["identity"]["recipe"]["precision"]
    torch.save(old, tmp_path / "b" / path.name)
    assert extract(tmp_path / "b", seeds=(1, 2)).images == 0
    assert extract(tmp_path / "b", seeds=(1, 2), precision="fp32").images == 0
    with pytest.raises(DataError, match="precision: 'fp32' in the file, 'bf16' asked"):
        extract(tmp_path / "b", precision="bf16")


def test_auto_encodes_at_fp32_where_the_check_fails_and_a_grown_bf16_file_keeps_its_promise(extract, tmp_path,
                                                                                          monkeypatch, capsys):
    monkeypatch.setattr(pace, "MATCH", 1.5)                          # no lower precision can match
    capsys.readouterr()
    made = torch.load(extract(tmp_path / "a").path, weights_only=True)
    assert made["identity"]["recipe"]["precision"] == made["settings"]["precision"] == "fp32"
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: bf16")] != []
    monkeypatch.undo()
    monkeypatch.setattr(pace, "fast_precision", lambda device: "bf16")
    # a bf16 file grown by a seed: an image encoded in another batch differs in its last bf16 bits, so the grown
    # file matches a fresh extraction to pace.MATCH, not bit for bit
    extract(tmp_path / "b")
    grown = torch.load(extract(tmp_path / "b", seeds=(1, 2)).path, weights_only=True)
    fresh = torch.load(extract(tmp_path / "c", seeds=(1, 2)).path, weights_only=True)
    assert grown["identity"]["recipe"] == fresh["identity"]["recipe"] and grown["paths"] == fresh["paths"]
    for key in ("test", "val", "train"):
        assert F.cosine_similarity(grown[key]["features"].float(), fresh[key]["features"].float(), dim=-1).min() \
            >= pace.MATCH, key
