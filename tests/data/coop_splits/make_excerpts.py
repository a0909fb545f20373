"""Writes the excerpts of CoOp's split files in this folder, from the full files (never committed).

Source: CoOp's split_zhou_*.json (github.com/KaiyangZhou/CoOp, DATASETS.md), as copied at
github.com/linzhiqiu/cross_modal_adaptation, commit c7e7e68, splits/; the full files' md5 are those
fewshot/download.py pins (and this script checks):

    split_zhou_OxfordPets.json           fadad0caba06c4d0d2baf192015f50b4   37 classes, 19 with underscores
    split_zhou_UCF101.json               3a70ae2e43036a21111f3692a43fc839  101 classes, 77 with underscores
    split_zhou_Caltech101.json           385cabeb25ebeebaa36167d7028ebc52  100 classes, 18 with underscores
    split_zhou_DescribableTextures.json  02ff57f1bbd002a43320737a3ecbc113   47 classes, none

An excerpt keeps the first CLASSES[file] classes of the file's label order (their labels unchanged, so the
class order is CoOp's), enough to hold underscored names where the file has them, and of each class the first
TRAIN / VAL / TEST entries of each split in the file's order, as [path, label, classname] entries.

    python tests/data/coop_splits/make_excerpts.py FOLDER_WITH_THE_FULL_FILES
"""
import hashlib
import json
import sys
from pathlib import Path

MD5 = {"split_zhou_OxfordPets.json": "fadad0caba06c4d0d2baf192015f50b4",
       "split_zhou_UCF101.json": "3a70ae2e43036a21111f3692a43fc839",
       "split_zhou_Caltech101.json": "385cabeb25ebeebaa36167d7028ebc52",
       "split_zhou_DescribableTextures.json": "02ff57f1bbd002a43320737a3ecbc113"}
CLASSES = {"split_zhou_OxfordPets.json": 4, "split_zhou_UCF101.json": 6, "split_zhou_Caltech101.json": 20,
           "split_zhou_DescribableTextures.json": 4}
PER_CLASS = {"train": 3, "val": 2, "test": 2}


def excerpt(split: dict, classes: int) -> dict:
    out = {}
    for name, per_class in PER_CLASS.items():
        kept, count = [], {}
        for path, label, classname in split[name]:
            if label < classes and count.get(label, 0) < per_class:
                kept.append([path, label, classname])
                count[label] = count.get(label, 0) + 1
        out[name] = kept
    return out


def main(folder: Path):
    for name, md5 in MD5.items():
        data = (folder / name).read_bytes()
        assert hashlib.md5(data).hexdigest() == md5, f"{name} is not the pinned file"
        split = excerpt(json.loads(data), CLASSES[name])
        lines = ",\n".join(f'  "{s}": [\n' + ",\n".join("    " + json.dumps(e) for e in split[s]) + "\n  ]"
                           for s in split)
        (Path(__file__).parent / name).write_text("{\n" + lines + "\n}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
