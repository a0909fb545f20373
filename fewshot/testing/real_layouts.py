"""CoOp's benchmarks laid out as their real split files list them, a placeholder image at every path, and what an
extraction of one must hold to be what CoOp's code builds: its class order and names, its prompts, the whole test
split, and few-shot subsets inside each class's own images. Used by tests/test_real_layouts.py (on the excerpts in
tests/data/coop_splits) and bench/real_layouts.py (on the full files).

    root = lay_out(split_file, "ucf101", tmp / "data")    # data/ucf101/split_zhou_UCF101.json + placeholders
    assert problems(features, json.loads(split_file.read_text()), "ucf101") == []
"""
import json
import os
import shutil
from pathlib import Path

from PIL import Image

import fewshot.datasets as fd

# CoOp's prompt template of each benchmark: trainers/zsclip.py CUSTOM_TEMPLATES (github.com/KaiyangZhou/CoOp at
# ff61507), written out here rather than read from fewshot.datasets, so that the check does not echo the code
COOP_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.",
}
NEGATIVE = "a photo of no {}."


def coop_name(classname: str) -> str:
    """CoOp's class name in a prompt (trainers/zsclip.py and coop.py: classname.replace("_", " "))."""
    return classname.replace("_", " ")


def split_classnames(split: dict) -> list[str]:
    """The class names of a CoOp split file, by label: CoOp's class order."""
    names = {label: name for part in split.values() for _, label, name in part}
    return [names[label] for label in range(len(names))]


def lay_out(split_file: Path, dataset: str, root: Path) -> Path:
    """`dataset` under `root` in CoOp's layout: its split file, and one tiny PNG (hard links of one file) at every
    path the file lists. Returns root."""
    spec = fd.DATASETS[dataset]
    folder = root / spec.folder
    images = folder / spec.images
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(split_file, folder / spec.split)
    placeholder = root / ".placeholder.png"
    Image.new("RGB", (8, 8), (128, 64, 32)).save(placeholder)
    for part in json.loads(split_file.read_text()).values():
        for path, _, _ in part:
            target = images / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(placeholder, target)
    return root


def problems(features: dict, split: dict, dataset: str) -> list[str]:
    """What an extracted features file gets wrong against its CoOp split file (empty: nothing)."""
    found = []
    names = [coop_name(c) for c in split_classnames(split)]
    if features["classnames"] != names:
        found.append(f"classnames: {features['classnames'][:5]}... instead of CoOp's {names[:5]}...")
    positive = [[COOP_TEMPLATES[dataset].format(n)] for n in names]
    if features["prompts"]["positive"] != positive:
        made = features["prompts"]["positive"]
        bad = next((i for i, (a, b) in enumerate(zip(made, positive)) if a != b), len(positive))
        found.append(f"positive prompt of class {bad}: {made[bad:bad + 1]} instead of {positive[bad:bad + 1]}")
    if features["prompts"]["negative"] != [[NEGATIVE.format(n)] for n in names]:
        found.append("negative prompts do not say CoOp's class names")
    test = sorted(zip(features["paths"]["test"], features["test"]["labels"].tolist()))
    if test != sorted((p, y) for p, y, _ in split["test"]):
        found.append(f"the test split holds {len(test)} images, not the split file's {len(split['test'])}")
    for key, part in (("fewshot", "train"), ("val_fewshot", "val")):
        own = {}                                                   # label -> the split file's images of the class
        for path, label, _ in split[part]:
            own.setdefault(label, set()).add(path)
        paths, labels = features["paths"][part], features[part]["labels"].tolist()
        for seed, rows in features[key].items():
            for label, picked in enumerate(rows.tolist()):
                chosen = [paths[i] for i in picked]
                if not set(chosen) <= own[label] or len(set(chosen)) != len(chosen) or \
                        {labels[i] for i in picked} != {label}:
                    found.append(f"seed {seed}, class {label}: {key} picks {chosen}, not distinct {part} images "
                                 f"of the class")
    return found


# -----------------------------------------------------------------------------
# bench/real_layouts.py: the same check on the full split files

FILES = {"oxford_pets": "split_zhou_OxfordPets.json", "ucf101": "split_zhou_UCF101.json",
         "caltech101": "split_zhou_Caltech101.json", "dtd": "split_zhou_DescribableTextures.json"}


def fetch_split(dataset: str, folder: Path) -> Path:
    """CoOp's split file of `dataset` in `folder`: there already if its md5 is download.py's pin, else fetched from
    its pinned location (torchvision's download_url, which checks the md5)."""
    from torchvision.datasets.utils import check_integrity, download_url

    from fewshot import download
    remote = download.DOWNLOADS[dataset].files[0]
    path = folder / remote.name
    if not check_integrity(str(path), remote.md5):
        download_url(remote.url, str(folder), remote.name, remote.md5)
    return path


def main(argv=None):
    """Lay out each full split file, extract it with a tiny random CLIP, and print what problems() finds."""
    import argparse
    import tempfile

    import torch

    import fewshot.extraction as ef
    import fewshot.features as ff
    from fewshot.testing.fixtures import tiny_clip
    p = argparse.ArgumentParser(description="CoOp's class-name rule and split on the full split files")
    p.add_argument("--splits", type=Path, default=Path("data/coop_splits"),
                   help="folder of CoOp's split files (fetched there when absent or not the pinned file)")
    p.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
    args = p.parse_args(argv)
    args.splits.mkdir(parents=True, exist_ok=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_clip(Path(tmp) / "clip.pt", "vit")
        print("| dataset | classes | with underscores | test images | few-shot rows checked | problems |")
        print("|---|---|---|---|---|---|")
        for dataset in args.datasets:
            split_file = fetch_split(dataset, args.splits)
            split = json.loads(split_file.read_text())
            root = lay_out(split_file, dataset, Path(tmp) / "data")
            settings = ff.Settings(dataset, clip_checkpoint=str(checkpoint), seeds=(1, 2, 3), max_shots=16, views=1)
            features = torch.load(ef.extract_features(settings, root, Path(tmp) / "features", device="cpu"),
                                  weights_only=True)
            found = problems(features, split, dataset)
            failed += bool(found)
            names = split_classnames(split)
            print(f"| {dataset} | {len(names)} | {sum('_' in n for n in names)} | {len(features['test']['labels'])} "
                  f"| {sum(r.numel() for r in features['fewshot'].values())} | {'; '.join(found) or 'none'} |",
                  flush=True)
    raise SystemExit(1 if failed else 0)
