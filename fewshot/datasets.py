"""What a dataset is: the field's standard layouts and split files, and the few-shot protocol.

The data layouts, split files, templates and few-shot protocol are CoOp's (Zhou et al., "Learning to Prompt
for Vision-Language Models", DATASETS.md): load_splits reads a dataset under --root, or a folder of class
subfolders (torchvision's ImageFolder convention) split 50 / 20 / 30 % per class as CoOp split its own
datasets; sample_fewshot draws a seed's K-shot subset. Each dataset's prompt template is CoOp's (the other
prompts: prompts.py). Nothing here loads CLIP or writes a file.
"""
import hashlib
import json
import math
import os
import posixpath
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewshot.errors import DataError
from fewshot.files import check_regular, node_kind

VAL_SHOTS = 4  # the protocol's validation size: min(K, 4) images per class
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LAYOUT_HINT = "see the dataset layouts in docs/datasets.md"


@dataclass(frozen=True)
class DatasetSpec:
    folder: str  # folder under --root
    images: str  # image folder inside it; split-file paths are relative to it
    split: str | None  # CoOp's split json inside `folder`, None for the other layouts
    template: str  # CoOp's hand-written prompt template
    layout: str = "coop"  # coop | imagenet | fgvc | shift (ImageNet variant, test split only)


_PHOTO = "a photo of a {}."
DATASETS = {
    "imagenet": DatasetSpec("imagenet", "images", None, _PHOTO, "imagenet"),
    "caltech101": DatasetSpec("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", _PHOTO),
    "oxford_pets": DatasetSpec("oxford_pets", "images", "split_zhou_OxfordPets.json",
                               "a photo of a {}, a type of pet."),
    "stanford_cars": DatasetSpec("stanford_cars", "", "split_zhou_StanfordCars.json", _PHOTO),
    "oxford_flowers": DatasetSpec("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                                  "a photo of a {}, a type of flower."),
    "food101": DatasetSpec("food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    "fgvc_aircraft": DatasetSpec("fgvc_aircraft", "images", None, "a photo of a {}, a type of aircraft.", "fgvc"),
    "sun397": DatasetSpec("sun397", "SUN397", "split_zhou_SUN397.json", _PHOTO),
    "dtd": DatasetSpec("dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    "eurosat": DatasetSpec("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "ucf101": DatasetSpec("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
    "imagenetv2": DatasetSpec("imagenetv2", "imagenetv2-matched-frequency-format-val", None, _PHOTO, "shift"),
    "imagenet-sketch": DatasetSpec("imagenet-sketch", "images", None, _PHOTO, "shift"),
    "imagenet-adversarial": DatasetSpec("imagenet-adversarial", "imagenet-a", None, _PHOTO, "shift"),
    "imagenet-rendition": DatasetSpec("imagenet-rendition", "imagenet-r", None, _PHOTO, "shift"),
}
SHIFT_DATASETS = tuple(key for key, spec in DATASETS.items() if spec.layout == "shift")  # test-only ImageNet variants


@dataclass
class Splits:
    classnames: list[str]
    images: Path  # folder the item paths are relative to
    train: list[tuple[str, int]]  # (relative path, label), sorted by label then path
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    class_map: list[int] | None = None  # ImageNet class index of each class (shift sets only)

    def coop_split(self) -> dict:
        """The split in CoOp's format, {"train"|"val"|"test": [[path, label, classname], ...]}: what a folder
        dataset's features file records, and what a split.json in that folder would hold to keep it."""
        return {s: [[p, y, self.classnames[y]] for p, y in getattr(self, s)] for s in ("train", "val", "test")}

    def sha256(self) -> str:
        """Hash of the class names and of every split's (path, label) items."""
        return hashlib.sha256(json.dumps([self.classnames, self.coop_split()]).encode()).hexdigest()


# ----------------------------------------------------------------------------- reading the layouts

def _require(path: Path, what: str, dataset: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: expected {path} for dataset '{dataset}' ({LAYOUT_HINT})")
    return path


def _read_lines(path: Path, dataset: str) -> list[str]:
    check_regular(path, "file")
    return [line.strip() for line in _require(path, "file", dataset).read_text().splitlines() if line.strip()]


def _outside(rel: str) -> bool:
    """True for an item path that could leave the folder it is relative to: absolute (/x, C:/x, ~/x), or with a
    `..` part. Split files name images inside their images folder, by relative paths."""
    parts = rel.replace("\\", "/").split("/")
    return rel.startswith(("/", "\\", "~")) or (len(rel) > 1 and rel[1] == ":") or ".." in parts


def _check_inside(splits: "Splits", where):
    """Every item of a split names a path inside the images folder: one line for the first that does not."""
    bad = [p for s in ("train", "val", "test") for p, _ in getattr(splits, s) if _outside(p)]
    if bad:
        raise DataError(f"{where} lists {len(bad)} image paths that leave its images folder {splits.images}, e.g. "
                        f"{bad[0]!r}; a split file names each image by its path inside that folder (no '..', not "
                        f"absolute) ({LAYOUT_HINT})")


def _scan(images: Path, sub: str, labels: dict[str, int]) -> list[tuple[str, int]]:
    """(path relative to `images`, label) of every image in images/sub/<folder>/ for the folders in `labels`."""
    items = []
    for folder, label in labels.items():
        d = images / sub / folder
        if d.is_dir():
            items += [(f"{sub}/{folder}/{f.name}".lstrip("/"), label) for f in d.iterdir()
                      if f.suffix.lower() in IMAGE_SUFFIXES]
    return items


def _read_split_file(path: Path, images: Path, dataset: str) -> Splits:
    """CoOp's split json: {"train"|"val"|"test": [[relative path, label, classname], ...]}, paths relative to
    `images`."""
    _require(path, "split file", dataset)
    check_regular(path, "split file")
    try:
        split = json.loads(path.read_text())
        entries = [(s, p, y, c) for s in ("train", "val", "test") for p, y, c in split.get(s, [])]
    except (ValueError, TypeError, AttributeError) as e:
        raise DataError(f"cannot parse split file {path}: {e} ({LAYOUT_HINT})") from None
    # a label is a class index: 1.7, 2.0, "2" or true are refused, never rounded into some class
    bad = [y for _, _, y, _ in entries if type(y) is not int]
    if bad:
        raise DataError(f"split file {path} has {len(bad)} labels that are not integers, e.g. {bad[0]!r}; "
                        f"labels must be class indices 0..C-1 ({LAYOUT_HINT})")
    odd = [(p, c) for _, p, _, c in entries
           if type(p) is not str or not p.strip() or type(c) is not str or not c.strip()]
    if odd:
        raise DataError(f"split file {path} has {len(odd)} entries whose image path or class name is not a name, e.g. "
                        f"{list(odd[0])!r}; each entry is [relative image path, label, class name] ({LAYOUT_HINT})")
    items = {s: [(p, y) for t, p, y, _ in entries if t == s] for s in ("train", "val", "test")}
    names = _one_name_per_label(((y, c) for _, _, y, c in entries), path)
    if sorted(names) != list(range(len(names))):
        raise DataError(f"labels in {path} are not 0..C-1 ({LAYOUT_HINT})")
    return Splits([names[y] for y in range(len(names))], images, **items)


def _one_name_per_label(pairs, path) -> dict:
    """{label: class name}; one line naming both when a label has two names or a name two labels."""
    names, labels = {}, {}
    for y, c in pairs:
        if names.setdefault(y, c) != c:
            raise DataError(f"{path} gives label {y} two class names, {names[y]!r} and {c!r}; a label is one class "
                            f"({LAYOUT_HINT})")
        if labels.setdefault(c, y) != y:
            raise DataError(f"{path} gives class {c!r} two labels, {labels[c]} and {y}; a class is one label "
                            f"({LAYOUT_HINT})")
    return names


def _distinct_images(splits: Splits, where) -> Splits:
    """Each image once per split (a split file that lists one twice counts it once, so that --max-shots is never
    met by repeating an image), and in one split only: an image that trains must never be a test image."""
    seen = {}  # normalised path -> (split, label)
    for split in ("train", "val", "test"):
        kept = []
        for path, label in getattr(splits, split):
            key = posixpath.normpath(path)
            if key in seen:
                other, other_label = seen[key]
                if other != split or other_label != label:
                    raise DataError(f"{where} lists image {path} in {other} (label {other_label}) and in {split} "
                                    f"(label {label}); an image belongs to one split and one class ({LAYOUT_HINT})")
                continue
            seen[key] = (split, label)
            kept.append((path, label))
        setattr(splits, split, kept)
    return splits


def _read_coop(name: str, spec: DatasetSpec, folder: Path) -> Splits:
    """A benchmark in CoOp's layout: its split json in `folder`, its images in folder/spec.images."""
    return _read_split_file(folder / spec.split, folder / spec.images, name)


def _read_fgvc(name: str, spec: DatasetSpec, folder: Path) -> Splits:
    """FGVC-Aircraft: variants.txt (class order) and images_variant_<split>.txt lines "imageid variant"."""
    classnames = _read_lines(folder / "variants.txt", name)
    label = {c: y for y, c in enumerate(classnames)}
    items = {}
    for s in ("train", "val", "test"):
        path = folder / f"images_variant_{s}.txt"
        pairs = [line.split(" ", 1) for line in _read_lines(path, name)]
        if any(len(p) < 2 or p[1] not in label for p in pairs):
            raise DataError(f"{path} has a line that is not 'imageid variant' with a variant from variants.txt")
        items[s] = [(f"{i}.jpg", label[v]) for i, v in pairs]
    return Splits(classnames, folder / spec.images, **items)


def _imagenet_classes(name: str, folder: Path) -> list[tuple[str, str]]:
    """classnames.txt lines "wnid class name" -> [(wnid, class name)] in ImageNet's label order."""
    return [tuple(line.split(" ", 1)) for line in _read_lines(folder / "classnames.txt", name)]


def _read_imagenet(name: str, spec: DatasetSpec, folder: Path) -> Splits:
    """ImageNet: images/train/<wnid>/, images/val/<wnid>/ (val is the test set), classnames.txt."""
    classes = _imagenet_classes(name, folder)
    images = folder / spec.images
    labels = {wnid: y for y, (wnid, _) in enumerate(classes)}
    _require(images / "train", "image folder", name), _require(images / "val", "image folder", name)
    return Splits([c for _, c in classes], images, _scan(images, "train", labels), [], _scan(images, "val", labels))


def _read_shift(name: str, spec: DatasetSpec, folder: Path) -> Splits:
    """An ImageNet variant: one folder per class present, named by wnid (or by ImageNet index for v2)."""
    classes = _imagenet_classes(name, folder)
    index = {wnid: y for y, (wnid, _) in enumerate(classes)} | {str(y): y for y in range(len(classes))}
    images = _require(folder / spec.images, "image folder", name)
    present = sorted((index[d.name], d.name) for d in images.iterdir() if d.is_dir() and d.name in index)
    labels = {d: y for y, (_, d) in enumerate(present)}
    return Splits([classes[i][1] for i, _ in present], images, [], [], _scan(images, "", labels),
                  class_map=[i for i, _ in present])


# ----------------------------------------------------------------------------- your own folder of images

FOLDER_SPLIT = (0.2, 0.3)  # a folder dataset's validation and test share of each class; training gets the rest
FOLDER_SPLIT_FILE = "split.json"  # a split in CoOp's format inside the folder, used instead of FOLDER_SPLIT
FOLDER_TEMPLATE = "a photo of a {}."  # a folder dataset's positive prompt template, unless --template


def is_folder(dataset: str) -> bool:
    """True for a folder of class subfolders (as resolve_dataset gives it: its absolute path), False for a key."""
    return dataset not in DATASETS


def dataset_name(dataset: str) -> str:
    """What a dataset is called in file names, tables and results: its key, or its folder's name."""
    return Path(dataset).name if is_folder(dataset) else dataset


def resolve_dataset(text: str) -> str:
    """--dataset as the code uses it: a key of DATASETS as it is, a folder of class subfolders as its absolute path.

    A key wins over a folder of the same name (./dtd names the folder); anything with a path separator, or a
    folder that exists, is a path.
    """
    if text in DATASETS:
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if "/" in text or os.sep in text:
        raise DataError(f"--dataset {text}: {'not a folder' if path.exists() else 'no such folder'}; give a folder "
                        f"holding one subfolder of images per class, or a dataset key ({', '.join(DATASETS)})")
    raise DataError(f"unknown dataset '{text}'; choose one of: {', '.join(DATASETS)}; or give a folder of class "
                    f"subfolders, e.g. ./{text}")


def _nfc(name: str) -> str:
    """A name in Unicode's composed form: macOS may store names decomposed and Linux keeps them as written, so
    that the same folder copied between them gives the same classes, order and split."""
    return unicodedata.normalize("NFC", name)


def _visible(name: str) -> bool:
    """Hidden files and folders (.DS_Store, ._img.jpg, .git) and the __MACOSX folders of macOS zip files hold
    no class and no image."""
    return not name.startswith(".") and name != "__MACOSX"


def _class_name(folder_name: str) -> str:
    """The class name of a class folder: "red_panda" and "red-panda" -> "red panda"."""
    return " ".join(_nfc(folder_name).replace("_", " ").replace("-", " ").split())


def shown(name) -> str:
    """A file or folder name as text that can be printed: bytes that are not UTF-8 (kept by Python as "surrogate
    escapes") are shown escaped, \\xe9, instead of ending the program with "surrogates not allowed"."""
    return os.fsencode(str(name)).decode("utf-8", "backslashreplace")


@dataclass
class _Walk:
    """What walking the class folders left out, said once for the whole dataset."""
    links: list = field(default_factory=list)   # (link, target) not followed: out of their class folder, or a loop
    nodes: list = field(default_factory=list)   # entries that are not regular files (pipes, sockets, devices)

    def warn(self, folder: Path):
        if self.links:
            link, target = self.links[0]
            print(f"warning: {len(self.links)} links in {shown(folder)} lead out of their class folder or back up "
                  f"into it and were not followed, e.g. {shown(link)} -> {shown(target)}", file=sys.stderr)
        if self.nodes:
            path, kind = self.nodes[0]
            print(f"warning: {len(self.nodes)} entries in {shown(folder)} named like images are not regular files "
                  f"and are left out, e.g. {shown(path)} ({kind})", file=sys.stderr)


def _images_under(folder: Path, walk: _Walk) -> list[str]:
    """The images below class folder `folder` at any depth, as paths relative to it (with /); hidden files and
    non-image files are left out. The class is its folder (resolved once, if it is a link): a link below it is
    followed only to a file or folder inside that folder, and not to a folder above the link (a loop); an image
    reached twice (through links) is counted once. What is left out goes to `walk`."""
    def unreadable(e: OSError):
        raise DataError(f"cannot read the folder {shown(e.filename)} ({e.strerror}); fix its permissions or remove it")
    home = Path(os.path.realpath(folder))
    found, real_images, walked = [], set(), set()
    pending = [(folder, home)]                         # (folder as reached, its real path)
    while pending:
        here, real = pending.pop()
        walked.add(real)
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as e:
            unreadable(e)
        for entry in entries:
            if not _visible(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                target = Path(os.path.realpath(path))
                if target != home and home not in target.parents or target in walked or target in real.parents \
                        or target == real:
                    walk.links.append((path, target))
                    continue
            else:
                target = real / entry.name
            if entry.is_dir():
                if target not in walked:
                    pending.append((path, target))
                continue
            if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            kind = node_kind(path)
            if kind:
                walk.nodes.append((path, kind))
            elif target not in real_images:            # an image reached twice counts once
                real_images.add(target)
                found.append(path.relative_to(folder).as_posix())
    return found


def _split_class(paths: list[str]) -> tuple[list[str], list[str], list[str]]:
    """One class's images -> (train, val, test): 50 / 20 / 30 %, rounded, at least one each.

    The images are ordered by the sha256 of their path within the class folder, so the split depends on the
    file names alone: the same on every machine and Python (no listdir order, no random state), and images
    added later move few of the others.
    """
    order = sorted(paths, key=lambda p: hashlib.sha256(os.fsencode(_nfc(p))).hexdigest())
    n_val, n_test = (max(1, math.floor(share * len(order) + 0.5)) for share in FOLDER_SPLIT)
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def _is_or_holds(entry: Path, outputs) -> bool:
    """True if the folder `entry` is one of the run's output folders or holds one (--features-dir inside a folder
    dataset): what the run writes is never read as a class."""
    real = Path(os.path.realpath(entry))
    return any(real == out or real in out.parents for out in outputs)


def _class_folders(folder: Path, outputs=()) -> list[Path]:
    """The class subfolders of `folder`, sorted by name, the run's output folders left out; one line if there are
    none, if two give one class name, if one is a link to another (or into it, or to the dataset itself), or if a
    name is not valid UTF-8 (it goes into the prompts)."""
    outputs = [Path(os.path.realpath(o)) for o in outputs]
    try:
        entries = sorted((e for e in folder.iterdir() if _visible(e.name)), key=lambda e: _nfc(e.name))
    except OSError as e:
        raise DataError(f"cannot read the folder {shown(folder)} ({e.strerror}); fix its permissions") from None
    classes = [e for e in entries if e.is_dir() and not _is_or_holds(e, outputs)]
    loose = sum(e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES for e in entries)
    if not classes:
        raise DataError(f"{shown(folder)} has no class subfolders" + (f" (it holds {loose} images directly)" if loose
                                                                       else "")
                        + f": put each class's images in a subfolder named after the class, e.g. "
                          f"{shown(folder)}/red_panda/")
    if loose:
        print(f"warning: {loose} images directly in {shown(folder)} are in no class subfolder and are left out",
              file=sys.stderr)
    names, reals, top = {}, {}, Path(os.path.realpath(folder))
    for c in classes:
        if os.fsencode(c.name) != c.name.encode("utf-8", "surrogatepass"):
            raise DataError(f"class folder {shown(c)}: its name is not valid UTF-8 (the bytes shown as \\x..), and a "
                            f"class name goes into the prompts; rename the folder")
        if not _class_name(c.name):
            raise DataError(f"class folder {shown(c)} gives no class name (underscores and hyphens become spaces); "
                            f"rename it")
        if _class_name(c.name) in names:
            raise DataError(f"class folders {shown(names[_class_name(c.name)])} and {shown(c)} both give the class "
                            f"name '{_class_name(c.name)}' (underscores and hyphens become spaces); rename one")
        names[_class_name(c.name)] = c
        real = Path(os.path.realpath(c))
        if real == top or real in top.parents:
            raise DataError(f"class folder {shown(c)} is a link to {shown(real)}, which holds the dataset itself; a "
                            f"class folder holds its own images: remove the link")
        twin = next((other for r, other in reals.items() if r == real or r in real.parents or real in r.parents), None)
        if twin is not None:
            linked, other = (c, twin) if c.is_symlink() else (twin, c)
            raise DataError(f"class folder {shown(linked)} is a link to {shown(real)}, the images of class folder "
                            f"{shown(other)} (or within them): the same images would be two classes; remove the link")
        reals[real] = c
    return classes


def _read_folder(folder: Path, outputs=()) -> Splits:
    """A folder of class subfolders (ImageFolder's layout): the classes are the subfolders in sorted order, their
    images those at any depth below them, split per class by _split_class, or as folder/split.json says.
    outputs: folders the run writes into (never read as classes)."""
    _require(folder, "dataset folder", folder.name)
    if (folder / FOLDER_SPLIT_FILE).is_file():
        return _read_split_file(folder / FOLDER_SPLIT_FILE, folder, folder.name)
    classes = _class_folders(folder, outputs)
    items = {"train": [], "val": [], "test": []}
    walk, counts = _Walk(), []
    for class_folder in classes:
        counts.append(_images_under(class_folder, walk))
    walk.warn(folder)
    for label, (class_folder, images) in enumerate(zip(classes, counts)):
        if len(images) < 3:
            found = f"{len(images)} image{'s' * (len(images) != 1)}" if images else \
                f"no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            raise DataError(f"class folder {shown(class_folder)} holds {found}: a class needs at least 3, one each for "
                            f"training, validation and test; add images or remove the folder")
        for split, paths in zip(items, _split_class(images)):
            items[split] += [(f"{class_folder.name}/{p}", label) for p in paths]
    return Splits([_class_name(c.name) for c in classes], folder, **items)


# ----------------------------------------------------------------------------- any dataset

def dataset_spec(dataset: str) -> DatasetSpec:
    """DATASETS[dataset], or one line listing the datasets there are."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def dataset_folder(dataset: str, root) -> Path:
    """Where a dataset's files are: its folder under `root`, or the folder a folder dataset is."""
    return Path(dataset) if is_folder(dataset) else Path(root) / dataset_spec(dataset).folder


def dataset_template(dataset: str) -> str:
    """The positive prompt template of a dataset: CoOp's for a benchmark, FOLDER_TEMPLATE for a folder."""
    return FOLDER_TEMPLATE if is_folder(dataset) else dataset_spec(dataset).template


def prompt_name(classname: str) -> str:
    """A class's name as its prompts say it: underscores as spaces, exactly as CoOp builds every prompt
    (trainers/zsclip.py, trainers/coop.py: classname.replace("_", " ")), as Tip-Adapter and CLIP-Adapter do; so
    UCF101's "Apply_Eye_Makeup" is "Apply Eye Makeup"."""
    return classname.replace("_", " ")


def load_splits(dataset: str, root, outputs=()) -> Splits:
    """Read the class names and the (path, label) items of each split of `dataset`: a key of DATASETS under
    `root`, or a folder of class subfolders (its path; `root` is not used; `outputs`, the folders the run writes
    into, are never classes). Every item is a path inside the dataset's images folder. The class names are those
    the prompts say (prompt_name), in every layout, so the features file's classnames are what was encoded."""
    if is_folder(dataset):
        splits, folder = _read_folder(Path(dataset), outputs), Path(dataset)
    else:
        spec = dataset_spec(dataset)
        folder = _require(Path(root) / spec.folder, "dataset folder", dataset)
        reader = {"coop": _read_coop, "fgvc": _read_fgvc, "imagenet": _read_imagenet, "shift": _read_shift}[spec.layout]
        splits = reader(dataset, spec, folder)
    _check_inside(splits, f"dataset '{shown(dataset_name(dataset))}' under {shown(folder)}")
    splits = _distinct_images(splits, f"dataset '{dataset_name(dataset)}' under {folder}")
    splits.classnames = [prompt_name(c) for c in splits.classnames]
    if len(set(splits.classnames)) != len(splits.classnames):
        twice = next(c for c in splits.classnames if splits.classnames.count(c) > 1)
        raise DataError(f"dataset '{dataset_name(dataset)}' under {folder} names two classes {twice!r} (underscores "
                        f"read as spaces, as the prompts say them); each class needs a name of its own ({LAYOUT_HINT})")
    if not splits.test:
        raise DataError(f"no test images found for dataset '{dataset_name(dataset)}' under {folder} ({LAYOUT_HINT})")
    # a fixed order (label, then path) makes a seed pick the same images on every machine
    for s in ("train", "val", "test"):
        setattr(splits, s, sorted(getattr(splits, s), key=lambda item: (item[1], item[0])))
    return splits


# ----------------------------------------------------------------------------- few-shot protocol

def sample_fewshot(labels: list[int], num_classes: int, shots: int, seed: int, allow_repeats: bool = False,
                   what: str = "training", classnames: list[str] | None = None,
                   flag: str = "--max-shots") -> torch.Tensor:
    """[C, shots] indices into `labels`, drawn with a generator seeded by `seed` alone. flag: the flag that set
    `shots`, which a class with fewer images is told to lower.

    Each class draws a full permutation of its items whatever `shots` is, so the K-shot subset is the first K
    columns of any larger subset (nested) and does not depend on the other settings.
    """
    generator = torch.Generator().manual_seed(seed)
    members = [[] for _ in range(num_classes)]
    for i, y in enumerate(labels):
        members[y].append(i)
    picks = []
    for y, idx in enumerate(members):
        name = f" ({classnames[y]!r})" if classnames else ""
        if not idx:  # nothing to repeat: --allow-repeats cannot help here
            raise DataError(f"class {y}{name} has no {what} images; every class needs at least one ({LAYOUT_HINT})")
        if len(idx) < shots and not allow_repeats:
            raise DataError(f"class {y}{name} has {len(idx)} {what} images, fewer than the {shots} needed; "
                            f"lower {flag} or pass --allow-repeats to reuse its images")
        order = torch.randperm(len(idx), generator=generator)
        order = order.repeat(-(-shots // len(idx)))[:shots]  # every image once before any repeats
        picks.append(torch.tensor(idx)[order])
    return torch.stack(picks)


def fewshot_rows(labels: list[int], classnames: list[str], shots: int, seeds, allow_repeats: bool, what: str,
                 flag: str = "--max-shots"):
    """The split indices needed by any seed (deduplicated, sorted) and, per seed, [C, shots] rows into them."""
    C = len(classnames)
    picks = {seed: sample_fewshot(labels, C, shots, seed, allow_repeats, what, classnames, flag) for seed in seeds}
    needed = torch.cat([p.flatten() for p in picks.values()]).unique()
    row = torch.full((len(labels),), -1, dtype=torch.long)
    row[needed] = torch.arange(len(needed))
    return needed.tolist(), {seed: row[p] for seed, p in picks.items()}
