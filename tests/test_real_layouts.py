"""CoOp's class-name rule on the real metadata: Oxford Pets, UCF101, Caltech101 and DTD laid out as excerpts of their
real split files list them (tests/data/coop_splits, made by make_excerpts.py from the md5-pinned files), a tiny
placeholder image at every path, extracted with a tiny CLIP: CoOp's class order, names and prompts (underscores as
spaces, trainers/zsclip.py), the whole test split, few-shot subsets inside each class's own images, and text
features of exactly those sentences. Then the rule on every other layout (FGVC's variants, ImageNet's
classnames.txt, the shift sets, a folder's split.json) and on a file made before it."""
import json
from pathlib import Path

import pytest
import torch

import fewshot.datasets as fd
import fewshot.extraction as ef
import fewshot.features as ff
from fewshot import backbones, pace
from fewshot.errors import DataError
from fewshot.testing.fixtures import write_dataset
from fewshot.testing.real_layouts import COOP_TEMPLATES, NEGATIVE, lay_out, problems, split_classnames

EXCERPTS = Path(__file__).parent / "data" / "coop_splits"
REAL = {"oxford_pets": "split_zhou_OxfordPets.json", "ucf101": "split_zhou_UCF101.json",
        "caltech101": "split_zhou_Caltech101.json", "dtd": "split_zhou_DescribableTextures.json"}
# what CoOp's code prompts, written out for a few classes of each excerpt (label: sentence)
SPOT = {"oxford_pets": {1: "a photo of a american bulldog, a type of pet.",
                        2: "a photo of a american pit bull terrier, a type of pet."},
        "ucf101": {0: "a photo of a person doing Apply Eye Makeup.", 2: "a photo of a person doing Archery."},
        "caltech101": {0: "a photo of a face.", 18: "a photo of a car side.", 19: "a photo of a ceiling fan."},
        "dtd": {0: "banded texture.", 3: "bubbly texture."}}


@pytest.fixture(scope="module")
def extracted(tiny_vit_checkpoint, tmp_path_factory):
    """Each excerpt laid out and extracted: {dataset: (features, split)}."""
    tmp = tmp_path_factory.mktemp("real_layouts")
    out, load = {}, backbones.load
    encoder = load(backbones.resolve(ff.Settings("dtd", clip_checkpoint=str(tiny_vit_checkpoint))), torch.device("cpu"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones, "load", lambda settings, device: encoder)   # one CLIP for the four: faster
        for dataset, name in REAL.items():
            root = lay_out(EXCERPTS / name, dataset, tmp / "data")
            settings = ff.Settings(dataset, clip_checkpoint=str(tiny_vit_checkpoint), seeds=(1, 2), max_shots=2,
                                   views=1)
            path = ef.extract_features(settings, root, tmp / "features", workers=0, device="cpu")
            out[dataset] = (torch.load(path, weights_only=True), json.loads((EXCERPTS / name).read_text()))
    return out


@pytest.mark.parametrize("dataset", list(REAL))
def test_a_real_layout_extracts_as_coop_builds_it(extracted, dataset, tiny_vit_checkpoint):
    features, split = extracted[dataset]
    assert problems(features, split, dataset) == []
    for label, sentence in SPOT[dataset].items():
        assert features["prompts"]["positive"][label] == [sentence]
    underscored = [c for c in split_classnames(split) if "_" in c]
    assert (len(underscored) > 0) == (dataset != "dtd")              # the excerpts hold the rule's cases
    assert not any("_" in s for p in features["prompts"]["positive"] + features["prompts"]["negative"] for s in p)
    assert features["fewshot"][1].shape == (len(features["classnames"]), 2)
    # the text features are those of CoOp's sentences, nothing else
    encoder = backbones.load(backbones.resolve(ff.Settings(dataset, clip_checkpoint=str(tiny_vit_checkpoint))),
                             torch.device("cpu"))
    names = [c.replace("_", " ") for c in split_classnames(split)]
    for which, template in (("positive", COOP_TEMPLATES[dataset]), ("negative", NEGATIVE)):
        at = pace.Pace(features["settings"]["precision"])                        # as the file was encoded
        expected = ef.encode_text(encoder, [[template.format(n)] for n in names], at, torch.device("cpu"))
        assert torch.equal(features["text"][which], expected), which


def test_the_check_catches_underscores_a_short_test_split_and_foreign_shots(extracted):
    """problems() has teeth: each of the faults the rule and the protocol guard against is reported."""
    features, split = extracted["ucf101"]
    raw = {**features, "prompts": {"positive": [[COOP_TEMPLATES["ucf101"].format(c)] for c in split_classnames(split)],
                                   "negative": features["prompts"]["negative"]}}
    assert any("positive prompt of class 0" in p for p in problems(raw, split, "ucf101"))
    short = {**features, "paths": {**features["paths"], "test": features["paths"]["test"][1:]},
             "test": {"labels": features["test"]["labels"][1:]}}
    assert any("the test split holds" in p for p in problems(short, split, "ucf101"))
    foreign = {**features, "fewshot": {1: features["fewshot"][1].roll(1, dims=0)}}    # class 0 gets class 5's
    assert any("seed 1, class 0" in p for p in problems(foreign, split, "ucf101"))


def raw_names(dataset: str, root: Path) -> list[str]:
    """The class names as a layout's own files spell them (never through load_splits), in label order."""
    spec = fd.DATASETS[dataset]
    folder = root / spec.folder
    if spec.layout == "fgvc":
        return (folder / "variants.txt").read_text().splitlines()
    if spec.layout in ("imagenet", "shift"):
        names = [line.split(" ", 1)[1] for line in (folder / "classnames.txt").read_text().splitlines()]
        present = {d.name for d in (folder / spec.images).iterdir()}
        wnids = [line.split(" ", 1)[0] for line in (folder / "classnames.txt").read_text().splitlines()]
        return [n for i, (w, n) in enumerate(zip(wnids, names)) if spec.layout == "imagenet" or
                w in present or str(i) in present]
    return split_classnames(json.loads((folder / spec.split).read_text()))


@pytest.mark.parametrize("dataset", list(fd.DATASETS))
def test_every_layout_prompts_its_names_with_spaces_for_underscores(dataset, tmp_path):
    """Every layout (CoOp's split files, FGVC's variants.txt, ImageNet's and the shift sets' classnames.txt), with
    names holding underscores: the classnames and every sentence are CoOp's construction."""
    root = write_dataset(tmp_path, dataset, num_classes=3)
    names = raw_names(dataset, root)
    assert any("_" in n for n in names)                                 # the fixture's names have underscores
    splits = fd.load_splits(dataset, root)
    (_, text_set), _ = ef.prompts_for(ff.Settings(dataset), splits.classnames)
    positive, negative = text_set["prompts"]["positive"], text_set["prompts"]["negative"]
    template = COOP_TEMPLATES.get(dataset, COOP_TEMPLATES["imagenet"])  # a shift set: ImageNet's
    assert splits.classnames == [n.replace("_", " ") for n in names]
    assert positive == [[template.format(n.replace("_", " "))] for n in names]
    assert negative == [[NEGATIVE.format(n.replace("_", " "))] for n in names]


def test_a_folder_split_file_and_a_prompts_file_follow_the_rule(tmp_path):
    folder = tmp_path / "mine"
    split = {s: [[f"a/{s}.jpg", 0, "red_panda"], [f"b/{s}.jpg", 1, "snow_leopard"]] for s in ("train", "val", "test")}
    folder.mkdir()
    (folder / fd.FOLDER_SPLIT_FILE).write_text(json.dumps(split))
    splits = fd.load_splits(str(folder), None)
    assert splits.classnames == ["red panda", "snow leopard"]
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"red_panda": ["a red panda."], "snow leopard": ["a snow leopard."]}))
    (_, text_set), _ = ef.prompts_for(ff.Settings(str(folder), prompts=str(prompts)), splits.classnames)
    assert text_set["prompts"]["positive"] == [["a red panda."], ["a snow leopard."]]
    split["train"].append(["c/train.jpg", 2, "red panda"])                # two spellings of one name: refused
    (folder / fd.FOLDER_SPLIT_FILE).write_text(json.dumps(split))
    with pytest.raises(DataError, match="names two classes 'red panda' \\(underscores read as spaces"):
        fd.load_splits(str(folder), None)


def test_a_file_made_with_underscored_prompts_is_stale(extracted, tiny_vit_checkpoint, tmp_path):
    """A features file of the same settings whose only prompt set kept the underscores (made before the rule) is
    never served as it is: its sentences are not those asked for, so the run encodes its own set beside it."""
    features, split = extracted["ucf101"]
    raw = split_classnames(split)
    settings = ff.Settings("ucf101", clip_checkpoint=str(tiny_vit_checkpoint), seeds=(1, 2), max_shots=2, views=1)
    (old_key, old_set), _ = ef.prompts_for(backbones.resolve(settings), raw)      # the set the old file recorded
    (key, _), _ = ef.prompts_for(backbones.resolve(settings), [c.replace("_", " ") for c in raw])
    assert old_key != key and key in features["texts"]
    old = {**features, "texts": {old_key: {**old_set, "text": features["texts"][key]["text"]}}}
    root = lay_out(EXCERPTS / REAL["ucf101"], "ucf101", tmp_path / "data")
    path = ff.features_path(tmp_path / "features", "ucf101", features["backbone"])
    path.parent.mkdir()
    torch.save(old, path)
    served = ef.Extraction(settings, root, tmp_path / "features", workers=0).features("ucf101", (1, 2), "cpu")
    assert not any("_" in s for p in served["prompts"]["positive"] + served["prompts"]["negative"] for s in p)
    assert set(torch.load(path, weights_only=True)["texts"]) == {old_key, key}     # the old set kept beside it
