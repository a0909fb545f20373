"""Downloads, each file pinned by its URL and checksum and never used when it differs.

    cupl_prompts("dtd")             -> ~/.cache/hegraphadapter/CuPL_prompts_dtd.json (downloaded once, sha256 checked)
    download_dataset("dtd", "data") -> data/dtd in CoOp's layout (--download): the images from their official
                                       location and CoOp's split file, checked, unpacked and then moved into place

The transfers and archives are torchvision's (torchvision.datasets.utils: download_url, which hands Google
Drive URLs to the gdown package, and extract_archive). DOWNLOADS pins every file a dataset needs, with where
its URL and checksum come from; MANUAL has the steps for the datasets without a public source.
"""
import contextlib
import errno
import functools
import hashlib
import http.client
import importlib.util
import os
import shutil
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fewshot import datasets, prompts
from fewshot.errors import DataError
from fewshot.files import acquire, file_lock, write_atomic

TIMEOUT_S = 60  # a transfer that receives nothing for this long fails, instead of hanging on a dead connection


def cache_dir() -> Path:
    """Where downloads are kept: $XDG_CACHE_HOME/hegraphadapter, else ~/.cache/hegraphadapter."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hegraphadapter"


def cupl_prompts(dataset: str) -> Path:
    """The CuPL descriptions of `dataset`, downloaded once from CUPL_PROMPTS into cache_dir(); the file's sha256
    is checked before every use, so a download that is cut short or altered is never used."""
    if dataset not in prompts.CUPL_PROMPTS:
        raise DataError(f"--prompts cupl: no CuPL descriptions are pinned for '{dataset}' (there are for "
                        f"{', '.join(prompts.CUPL_PROMPTS)}); pass --prompts FILE.json of "
                        f"{{classname: [sentence, ...]}}")
    url, sha256 = prompts.CUPL_PROMPTS[dataset]
    path = cache_dir() / url.rsplit("/", 1)[-1]
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path
    print(f"downloading the CuPL prompts of {dataset} from {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:  # no network, HTTP errors, a connection cut short
        raise DataError(f"--prompts cupl: cannot download {url} ({e}); download it by hand and pass "
                        f"--prompts FILE") from None
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise DataError(f"--prompts cupl: {url} has sha256 {found}, not the pinned {sha256} (a broken download, "
                        f"or the file changed); nothing was cached or used")
    write_atomic(path, lambda f: f.write(data))
    return path


# ----------------------------------------------------------------------------- what --download fetches

@dataclass(frozen=True)
class Remote:
    """One file of a dataset's download."""
    url: str         # its official location; a Google Drive URL is fetched by gdown (torchvision hands it over)
    md5: str | None  # its checksum (torchvision's kind); None where none could be pinned: then the dataset it
                     # unpacks into must load with every image of its split present, or the file is fetched again
    into: str        # folder, relative to the download's build folder, that it is unpacked (or, a .json, copied) into
    filename: str = ""  # the name it is saved under; default: the URL's last part

    @property
    def name(self) -> str:
        return self.filename or self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetDownload:
    """What --download fetches for one dataset, and how it is laid out in CoOp's layout."""
    files: tuple[Remote, ...]                 # fetched in this order: the small split file first
    unpack: tuple[tuple[str, str], ...] = ()  # (archive inside an unpacked one, folder to unpack it into)
    rename: tuple[tuple[str, str], ...] = ()  # (folder as unpacked, CoOp's name for it)


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view"


# Citations. [tv]: torchvision 0.29.1, torchvision/datasets/<file>.py, the dataset class's download(): URL and
# md5 as it pins them. [coop]: CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp, commit 0f24bd6), which gives the
# Google Drive file of each split_zhou_*.json and of UCF101's mid-frames. The split files' md5 are those of the
# copies at github.com/linzhiqiu/cross_modal_adaptation, commit c7e7e68, splits/ (CoOp's formatting: json,
# indent 4); the sha256 of the DTD, EuroSAT and Flowers copies also match ones that other projects recorded for
# their own downloads. Not pinned, so checked by loading (see Remote.md5): Food101's and SUN397's split files
# (too large for that copy to be stored here; its git blob ids are 39557040ee65... and 8d5725db8f70...),
# FGVC-Aircraft's archive (torchvision pins none), UCF101's mid-frames (no checksum published).
DOWNLOADS = {
    "caltech101": DatasetDownload((
        Remote(_drive("1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"), "385cabeb25ebeebaa36167d7028ebc52", "caltech-101",
               "split_zhou_Caltech101.json"),                                                     # [coop]
        Remote("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
               "3138e1922a9193bfa496528edbbc45d0", ""),                                           # [tv] caltech.py
    ), unpack=(("caltech-101/101_ObjectCategories.tar.gz", "caltech-101"),)),
    "oxford_pets": DatasetDownload((
        Remote(_drive("1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"), "fadad0caba06c4d0d2baf192015f50b4", "oxford_pets",
               "split_zhou_OxfordPets.json"),                                                     # [coop]
        # [tv] oxford_iiit_pet.py
        Remote("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
               "5c4f3ee8e5d25df40f4fd59a7f44e54c", "oxford_pets"),
    )),
    "oxford_flowers": DatasetDownload((
        Remote(_drive("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"), "cfeaf0508c398ca993bf48ca5f034569", "oxford_flowers",
               "split_zhou_OxfordFlowers.json"),                                                  # [coop]
        Remote("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
               "52808999861908f626f3c1f4e79d11fa", "oxford_flowers"),                             # [tv] flowers102.py
    )),
    "food101": DatasetDownload((
        Remote(_drive("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"), None, "food-101", "split_zhou_Food101.json"),  # [coop]
        Remote("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "85eeb15f3717b99a5da872d97d918f87", ""),  # [tv]
    )),
    "fgvc_aircraft": DatasetDownload((
        # [tv] fgvc_aircraft.py
        Remote("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz", None, ""),
    ), rename=(("fgvc-aircraft-2013b/data", "fgvc_aircraft"),)),  # CoOp: "keep only data/, rename it"
    "sun397": DatasetDownload((
        Remote(_drive("1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"), None, "sun397", "split_zhou_SUN397.json"),  # [coop]
        Remote("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
               "8ca2778205c41d23104230ba66911c7a", "sun397"),                                     # [tv] sun397.py
    )),
    "dtd": DatasetDownload((
        Remote(_drive("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"), "02ff57f1bbd002a43320737a3ecbc113", "dtd",
               "split_zhou_DescribableTextures.json"),                                            # [coop]
        Remote("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
               "fff73e5086ae6bdbea199a49dfb8a4c1", ""),                                           # [tv] dtd.py
    )),
    "eurosat": DatasetDownload((
        Remote(_drive("1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"), "989e1eca757dec43cfcee28faf6b28fc", "eurosat",
               "split_zhou_EuroSAT.json"),                                                        # [coop]
        # CoOp's madm.dfki.de link is gone; torchvision's copy is the same EuroSAT.zip (RGB, 2750/) at a pinned commit
        Remote("https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/"
               "EuroSAT.zip", "c8fa014336c82ac7804f0398fcb19387", "eurosat"),                     # [tv] eurosat.py
    )),
    "ucf101": DatasetDownload((
        Remote(_drive("1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"), "3a70ae2e43036a21111f3692a43fc839", "ucf101",
               "split_zhou_UCF101.json"),                                                         # [coop]
        Remote(_drive("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"), None, "ucf101", "UCF-101-midframes.zip"),  # [coop]
    )),
}

_SHIFT_STEPS = """  1. Set up imagenet first (python train.py --dataset imagenet --download prints how): its
     classnames.txt is needed.
  2. {get}
  3. cp {root}/imagenet/classnames.txt {root}/{folder}/
  (CoOp's DATASETS.md, section {section}, has the same steps.)"""
MANUAL = {  # dataset -> the steps that put it under --root ({root}), for the datasets without a public download
    "imagenet": """ImageNet needs an account: its images cannot be downloaded for you.
  1. Sign in at https://image-net.org/download-images.php and download, from "ILSVRC2012", the training images
     (ILSVRC2012_img_train.tar, 138 GB), the validation images (ILSVRC2012_img_val.tar, 6.3 GB) and the
     development kit (ILSVRC2012_devkit_t12.tar.gz); put the three files in {root}/imagenet/images/
  2. Unpack them into images/train/<wnid>/ and images/val/<wnid>/ with torchvision (it checks their md5 too):
     python -c "import torchvision.datasets as d; \
[d.ImageNet('{root}/imagenet/images', split=s) for s in ('train', 'val')]"
     then delete the three archives.
  3. Download CoOp's class names (CLIP's) to {root}/imagenet/classnames.txt:
     https://drive.google.com/file/d/1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF/view
     (or: gdown 1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF -O {root}/imagenet/classnames.txt)""",
    "stanford_cars": """Stanford Cars' original host (ai.stanford.edu/~jkrause/cars) is gone,
and torchvision no longer downloads it.
  1. Find a copy of the original archives cars_train.tgz and cars_test.tgz (e.g. the Kaggle dataset
     jessicali9530/stanford-cars-dataset, which needs an account) and unpack them so that the 8,144 training
     images are in {root}/stanford_cars/cars_train/ and the 8,041 test images in {root}/stanford_cars/cars_test/
     (00001.jpg, 00002.jpg, ...).
  2. Download CoOp's split to {root}/stanford_cars/split_zhou_StanfordCars.json:
     https://drive.google.com/file/d/1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT/view
     (or: gdown 1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT -O {root}/stanford_cars/split_zhou_StanfordCars.json)""",
    "imagenetv2": _SHIFT_STEPS.format(
        get="Download imagenetv2-matched-frequency.tar.gz as https://github.com/modestyachts/ImageNetV2 says and "
            "unpack it into {root}/imagenetv2/ (it holds imagenetv2-matched-frequency-format-val/)",
        root="{root}", folder="imagenetv2", section="ImageNetV2"),
    "imagenet-sketch": _SHIFT_STEPS.format(
        get="Download ImageNet-Sketch as https://github.com/HaohanWang/ImageNet-Sketch says and unpack it so that "
            "its class folders (n01440764, ...) are in {root}/imagenet-sketch/images/",
        root="{root}", folder="imagenet-sketch", section="ImageNet-Sketch"),
    "imagenet-adversarial": _SHIFT_STEPS.format(
        get="Download https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar and unpack it into "
            "{root}/imagenet-adversarial/ (it holds imagenet-a/)",
        root="{root}", folder="imagenet-adversarial", section="ImageNet-A"),
    "imagenet-rendition": _SHIFT_STEPS.format(
        get="Download https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar and unpack it into "
            "{root}/imagenet-rendition/ (it holds imagenet-r/)",
        root="{root}", folder="imagenet-rendition", section="ImageNet-R"),
}


# ----------------------------------------------------------------------------- --download

def download_dataset(dataset: str, root) -> Path:
    """--download: `dataset` in CoOp's layout under `root`, unless it is there already; returns its folder.

    Files are fetched into root/.FOLDER.download/ and unpacked into its build/ folder; the dataset folder is
    moved into place only when every pinned file matched its checksum and the dataset loads with every image of
    its split present. A failed, cut or interrupted download so leaves no dataset folder; a rerun reuses the
    files fetched and checked before and fetches the others again. Processes downloading it take turns.
    """
    target = Path(root) / datasets.dataset_spec(dataset).folder
    with acquire(file_lock(target), target):
        if target.exists():  # (a manual dataset is only looked at when read: ImageNet's folders are large)
            return _check_present(dataset, root, target) if dataset in DOWNLOADS else target
        if dataset not in DOWNLOADS:
            print(MANUAL[dataset].format(root=Path(root)), flush=True)
            raise DataError(f"--download: {dataset} has no public download; put it in {target} by the steps above, "
                            f"then rerun")
        plan, staging = DOWNLOADS[dataset], target.with_name(f".{target.name}.download")
        _check_gdown(dataset, plan)
        with _transfer_settings():
            files = [_fetch(remote, staging) for remote in plan.files]
        build = _unpack(plan, files, staging)
        _verify(dataset, build, plan, staging)
        os.rename(build / target.name, target)
        shutil.rmtree(staging)
    print(f"downloaded {dataset} into {target}", flush=True)
    return target


def _check_present(dataset: str, root, target: Path) -> Path:
    """A dataset folder that is there is used if it loads; one that does not is never replaced or deleted."""
    try:
        datasets.load_splits(dataset, root)
    except DataError as e:
        raise DataError(f"--download: {target} exists but does not load ({e}); move it away and rerun to download "
                        f"{dataset}, or complete it by hand") from None
    return target


def _check_gdown(dataset: str, plan: DatasetDownload):
    """One line before any transfer if a file is on Google Drive and gdown, which torchvision fetches it with, is
    absent."""
    drive = [r for r in plan.files if r.url.startswith("https://drive.google.com/")]
    if drive and importlib.util.find_spec("gdown") is None:
        raise DataError(f"--download: {dataset}'s {drive[0].name} is on Google Drive ({drive[0].url}), which needs the "
                        f"gdown package: pip install gdown (it is in requirements.txt), then rerun")


@contextlib.contextmanager
def _transfer_settings():
    """Progress bars only on a terminal (torchvision draws its download bar everywhere, e.g. into log files), and
    a connection that stays silent for TIMEOUT_S fails instead of hanging."""
    import torchvision.datasets.utils as tv  # here: importing torchvision takes a second and only downloads need it
    bar, timeout = tv.tqdm, socket.getdefaulttimeout()
    tv.tqdm = functools.partial(bar, disable=None)  # tqdm's disable=None: off when the output is no terminal
    socket.setdefaulttimeout(TIMEOUT_S)
    try:
        yield
    finally:
        tv.tqdm = bar
        socket.setdefaulttimeout(timeout)


def _reason(e: Exception) -> str:
    """An exception as a few words: its message's first line, or its type."""
    first = str(e).strip().split("\n")[0]
    return first if first else type(e).__name__


def _fetch(remote: Remote, staging: Path) -> Path:
    """staging/NAME: kept from an earlier run (or put there by hand) if it matches its md5, else downloaded into
    staging/partial/ and moved up once complete and checked; one line naming the URL if it cannot be had."""
    from torchvision.datasets.utils import calculate_md5, download_url
    path, partial = staging / remote.name, staging / "partial"
    if path.is_file() and (remote.md5 is None or calculate_md5(path) == remote.md5):
        print(f"using {path}, fetched before", flush=True)
        return path
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted transfer left
    print(f"downloading {remote.url}", flush=True)
    try:
        download_url(remote.url, str(partial), remote.name)
    except Exception as e:
        raise DataError(f"--download: cannot download {remote.url} ({_reason(e)}); check the connection and rerun, "
                        f"or download it by hand to {path} and rerun") from None
    got = partial / remote.name
    found = calculate_md5(got) if remote.md5 else None
    if found != remote.md5:
        shutil.rmtree(partial)
        raise DataError(f"--download: {remote.url} has md5 {found}, not the pinned {remote.md5} (a transfer cut short, "
                        f"or the file changed at its source); nothing was kept: rerun, or download it by hand to "
                        f"{path} and check it")
    os.replace(got, path)
    return path


def _unpack(plan: DatasetDownload, files: list[Path], staging: Path) -> Path:
    """staging/build/ made afresh from the fetched files: archives unpacked (also those inside them), the split
    file copied, folders renamed to CoOp's names. A file that cannot be unpacked is deleted (fetched again next run)."""
    from torchvision.datasets.utils import extract_archive
    build = staging / "build"
    shutil.rmtree(build, ignore_errors=True)
    steps = [(path, build / remote.into, remote.url, False) for remote, path in zip(plan.files, files)]
    steps += [(build / inner, build / into, f"{inner} in the download", True) for inner, into in plan.unpack]
    for path, into, source, inner in steps:
        into.mkdir(parents=True, exist_ok=True)
        try:
            if path.suffix == ".json":
                shutil.copyfile(path, into / path.name)
            else:
                print(f"unpacking {path.name}", flush=True)
                extract_archive(str(path), str(into), remove_finished=inner)  # an inner archive: done with
        except Exception as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS):
                raise DataError(f"--download: cannot unpack {path.name} into {into} ({_reason(e)}); free some space "
                                f"or choose another --root, then rerun") from None
            path.unlink(missing_ok=True)
            raise DataError(f"--download: cannot unpack {path.name} from {source} ({_reason(e)}): it is damaged or "
                            f"incomplete and was deleted; rerun to fetch it again") from None
    for old, new in plan.rename:
        os.rename(build / old, build / new)
    return build


def _verify(dataset: str, build: Path, plan: DatasetDownload, staging: Path):
    """The unpacked dataset loads and every image of its split is there; else the unpinned files, which nothing
    else has checked, are deleted (fetched again next run) and one line says so."""
    try:
        splits = datasets.load_splits(dataset, build)
        missing = [p for items in (splits.train, splits.val, splits.test) for p, _ in items
                   if not (splits.images / p).is_file()]
        if missing:
            raise DataError(f"{len(missing)} images of its split are not in the downloaded files, e.g. {missing[0]}")
    except DataError as e:
        unpinned = [r for r in plan.files if r.md5 is None]
        for remote in unpinned:
            (staging / remote.name).unlink(missing_ok=True)
        again = f"; {', '.join(r.name for r in unpinned)} (not pinned by a checksum) deleted" if unpinned else ""
        raise DataError(f"--download: the downloaded {dataset} is not complete ({e}){again}: rerun, and report it if "
                        f"it persists") from None
