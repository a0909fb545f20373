"""Downloads, each file pinned by its URL and checksum and never used when it differs.

    cupl_prompts("dtd")             -> ~/.cache/hegraphadapter/CuPL_prompts_dtd.json (downloaded once, sha256 checked)
    download_dataset("dtd", "data") -> data/dtd in CoOp's layout (--download): the images from their official
                                       location and CoOp's split file, checked, unpacked and then moved into place

Google Drive files go to the gdown package, as torchvision's download_url hands them over. Other files are
fetched here, with urllib, because torchvision's transfer has no deadline: a server that trickles bytes would
keep it alive for ever. Each transfer stops when nothing arrives for STALL_S (it stalled) or when it runs past
a deadline scaled to the file's size (it is too slow), and says which. Archives are unpacked here too, inside
their folder only: tarfile's "data" filter for a tar, the same rules for a zip (no absolute names, no "..",
no links out, no devices); a refused archive is named with its member and nothing of it is kept unpacked.
DOWNLOADS pins every file a dataset needs, with where its URL and checksum come from; MANUAL has the steps for
the datasets without a public source.

Offline, --download prints every file it still needs with its URL, size, checksum and the path to put it at
(ROOT/FOLDER.download/NAME: a visible folder, so that a file can be put there by hand; it becomes the dataset
folder only once everything in it is checked). A file put there by hand is checked like a download, and one
whose checksum differs is refused and left there for the user to look at.
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
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from fewshot import datasets, prompts
from fewshot.errors import DataError
from fewshot.files import FULL, acquire, file_lock, mib, no_room, write_atomic

STALL_S = 60        # a transfer that receives nothing for this long has stalled (also: no answer at all)
GRACE_S = 300       # the deadline of a transfer: GRACE_S plus its size at MIN_RATE, so
MIN_RATE = 100_000  # a transfer slower than 100 kB/s on average fails, and a 625 MB archive may take 1 h 50 min


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
    size: int | None = None  # its size in bytes where a source records it (else the server's Content-Length)

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
# their own downloads. [tfds]: the sizes, from TensorFlow Datasets' url_checksums/<name>.txt (github.com/
# tensorflow/datasets, commit 333639b for dtd, oxford_iiit_pet and sun397, 24211da for oxford_flowers102,
# 25a2824 for food101, f921fd8 for fgvc), which record each file's size and sha256. FGVC-Aircraft's md5
# d4acdd33327262359767eeaa97a4f732 is the one R's torchvision (github.com/mlverse/torchvision, commit 041fa5d,
# R/dataset-fgvc.R) and other projects' download scripts check. Not pinned, so checked by loading (see
# Remote.md5): Food101's and SUN397's split files (too large for that copy to be stored here; its git blob ids
# are 39557040ee65... and 8d5725db8f70...; no project found records their checksum) and UCF101's mid-frames
# (no checksum published or recorded anywhere found).
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
               "5c4f3ee8e5d25df40f4fd59a7f44e54c", "oxford_pets", size=791918971),            # [tfds]
    )),
    "oxford_flowers": DatasetDownload((
        Remote(_drive("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"), "cfeaf0508c398ca993bf48ca5f034569", "oxford_flowers",
               "split_zhou_OxfordFlowers.json"),                                                  # [coop]
        Remote("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
               "52808999861908f626f3c1f4e79d11fa", "oxford_flowers", size=344862509),  # [tv] flowers102.py, [tfds]
    )),
    "food101": DatasetDownload((
        Remote(_drive("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"), None, "food-101", "split_zhou_Food101.json"),  # [coop]
        Remote("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "85eeb15f3717b99a5da872d97d918f87", "",
               size=4996278331),                                                                   # [tv], [tfds]
    )),
    "fgvc_aircraft": DatasetDownload((
        # [tv] fgvc_aircraft.py (its URL); md5: mlverse/torchvision; size: [tfds]
        Remote("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
               "d4acdd33327262359767eeaa97a4f732", "", size=2770575360),
    ), rename=(("fgvc-aircraft-2013b/data", "fgvc_aircraft"),)),  # CoOp: "keep only data/, rename it"
    "sun397": DatasetDownload((
        Remote(_drive("1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"), None, "sun397", "split_zhou_SUN397.json"),  # [coop]
        Remote("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
               "8ca2778205c41d23104230ba66911c7a", "sun397", size=39077296924),         # [tv] sun397.py, [tfds]
    )),
    "dtd": DatasetDownload((
        Remote(_drive("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"), "02ff57f1bbd002a43320737a3ecbc113", "dtd",
               "split_zhou_DescribableTextures.json"),                                            # [coop]
        Remote("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
               "fff73e5086ae6bdbea199a49dfb8a4c1", "", size=625239812),                # [tv] dtd.py, [tfds]
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

def staging_folder(target: Path) -> Path:
    """Where a dataset's files are fetched to (and may be put by hand), then unpacked: ROOT/FOLDER.download."""
    return target.with_name(f"{target.name}.download")


def download_dataset(dataset: str, root) -> Path:
    """--download: `dataset` in CoOp's layout under `root`, unless it is there already; returns its folder.

    Files are fetched into root/FOLDER.download/ and unpacked into its build/ folder; the dataset folder is
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
        plan, staging = DOWNLOADS[dataset], staging_folder(target)
        _check_gdown(dataset, plan)
        with _transfer_settings():
            files = []
            for remote in plan.files:
                try:
                    files.append(_fetch(remote, staging))
                except Unreachable as e:
                    _list_needed(dataset, plan, staging)
                    raise DataError(f"--download: cannot reach {remote.url} ({e}); the files {dataset} still needs "
                                    f"are listed above, each with the path to put it at: download them by hand and "
                                    f"rerun") from None
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
    drive = [r for r in plan.files if _is_drive(r.url)]
    if drive and importlib.util.find_spec("gdown") is None:
        raise DataError(f"--download: {dataset}'s {drive[0].name} is on Google Drive ({drive[0].url}), which needs the "
                        f"gdown package: pip install gdown (it is in requirements.txt), then rerun")


def _is_drive(url: str) -> bool:
    return url.startswith("https://drive.google.com/")


@contextlib.contextmanager
def _transfer_settings():
    """Progress bars only on a terminal (torchvision draws its download bar everywhere, e.g. into log files), and
    a connection that stays silent for STALL_S fails instead of hanging (gdown's transfers too)."""
    import torchvision.datasets.utils as tv  # here: importing torchvision takes a second and only downloads need it
    bar, timeout = tv.tqdm, socket.getdefaulttimeout()
    tv.tqdm = functools.partial(bar, disable=None)  # tqdm's disable=None: off when the output is no terminal
    socket.setdefaulttimeout(STALL_S)
    try:
        yield
    finally:
        tv.tqdm = bar
        socket.setdefaulttimeout(timeout)


def _reason(e: Exception) -> str:
    """An exception as a few words: its message's first line, or its type."""
    first = str(e).strip().split("\n")[0]
    return first if first else type(e).__name__


class Unreachable(Exception):
    """A file's server cannot be reached at all (no network, no such host, connection refused)."""


def _unreachable(e: Exception) -> bool:
    """True for a failure to reach the server at all, not one of the server's answers or of this disk."""
    if isinstance(e, urllib.error.HTTPError) or isinstance(e, OSError) and e.errno in FULL:
        return False
    if isinstance(e, urllib.error.URLError):
        return isinstance(e.reason, OSError) and not isinstance(e.reason, TimeoutError)
    return isinstance(e, ConnectionError) or type(e).__name__ == "ConnectionError"  # requests' (gdown)


def _size(n: int | None) -> str:
    return f"{n:,} bytes" if n else "size unknown"


def _list_needed(dataset: str, plan: DatasetDownload, staging: Path):
    """Every file of the dataset not yet fetched and checked, with its URL, size, checksum and the path to put it
    at (printed: a download by hand, where there is a network, then a rerun, which checks it)."""
    needed = [r for r in plan.files if not _present(r, staging)]
    print(f"--download {dataset}: {len(needed)} of {len(plan.files)} files are still needed; download each where "
          f"there is a network and put it at the path shown (it is checked when you rerun):", flush=True)
    for r in needed:
        check = f"md5 {r.md5}" if r.md5 else "no checksum pinned: checked by loading the dataset"
        print(f"  {r.url}\n      -> {(staging / r.name).absolute()}  ({_size(r.size)}, {check})", flush=True)


def _present(remote: Remote, staging: Path) -> bool:
    """True if the file is in the staging folder and matches its pinned md5 (or has none pinned)."""
    from torchvision.datasets.utils import calculate_md5
    path = staging / remote.name
    return path.is_file() and (remote.md5 is None or calculate_md5(path) == remote.md5)


def _fetch(remote: Remote, staging: Path) -> Path:
    """staging/NAME: kept from an earlier run, or put there by hand, if it matches its md5 (one whose md5 differs
    is refused and left there), else downloaded into staging/partial/ and moved up once complete and checked;
    one line naming the URL if it cannot be had, and Unreachable if its server cannot be reached."""
    from torchvision.datasets.utils import calculate_md5, download_url
    path, partial = staging / remote.name, staging / "partial"
    if path.exists() and not path.is_file():
        raise DataError(f"--download: {path} is there and is not a regular file; move it away and rerun")
    if path.is_file():
        found = calculate_md5(path) if remote.md5 else None
        if found != remote.md5:
            raise DataError(f"--download: {path} is there (put by hand?) and its md5 is {found}, not the pinned "
                            f"{remote.md5} of {remote.url}: it is another file, or incomplete, and was left there "
                            f"for you to inspect; delete or replace it, then rerun")
        print(f"using {path}, fetched before or put there by hand", flush=True)
        return path
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted transfer left
    partial.mkdir(parents=True)
    print(f"downloading {remote.url}", flush=True)
    got = partial / remote.name
    try:
        if _is_drive(remote.url):
            download_url(remote.url, str(partial), remote.name)  # torchvision hands it to gdown
        else:
            _transfer(remote.url, got, remote.size)
    except DataError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in FULL:
            raise no_room(path, remote.size, "--root") from None
        if _unreachable(e):
            raise Unreachable(_reason(e)) from None
        raise DataError(f"--download: cannot download {remote.url} ({_reason(e)}); check the connection and rerun, "
                        f"or download it by hand to {path} and rerun") from None
    found = calculate_md5(got) if remote.md5 else None
    if found != remote.md5:
        shutil.rmtree(partial)
        raise DataError(f"--download: {remote.url} has md5 {found}, not the pinned {remote.md5} (a transfer cut short, "
                        f"or the file changed at its source); nothing was kept: rerun, or download it by hand to "
                        f"{path} and check it")
    os.replace(got, path)
    partial.rmdir()
    return path


def _transfer(url: str, dest: Path, size: int | None):
    """url -> dest over HTTP(S), bounded in time: each wait for data by STALL_S (a stall), the whole transfer by
    GRACE_S + size / MIN_RATE (too slow; size: the server's Content-Length, else the table's, else what has
    arrived so far, so that a trickle is caught too). The disk's room is checked before the first byte."""
    import torchvision.datasets.utils as tv
    start = time.monotonic()
    request = urllib.request.Request(url, headers={"User-Agent": tv.USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=STALL_S)
    except (TimeoutError, urllib.error.URLError) as e:
        if not isinstance(e, TimeoutError) and not isinstance(e.reason, TimeoutError):
            raise
        raise DataError(f"--download: {url} stalled: no answer within {STALL_S} s; rerun to try again, or download "
                        f"it by hand to {dest.parents[1] / dest.name} and rerun") from None
    with response:
        length = int(response.headers.get("Content-Length") or 0) or None
        total = length or size
        if total and shutil.disk_usage(dest.parent).free < total:
            raise no_room(dest.parents[1] / dest.name, total, "--root")
        received, read = 0, getattr(response, "read1", response.read)
        with open(dest, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, disable=None) as bar:
            while True:
                try:
                    chunk = read(1 << 20)  # what has arrived, at most 1 MiB; each wait bounded by STALL_S
                except TimeoutError:
                    raise DataError(f"--download: {url} stalled: nothing arrived for {STALL_S} s after "
                                    f"{received:,} of {_size(total)}; rerun to try again, or download it by hand to "
                                    f"{dest.parents[1] / dest.name} and rerun") from None
                except http.client.IncompleteRead:
                    chunk = b""
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    if e.errno in FULL:
                        raise no_room(dest.parents[1] / dest.name, total, "--root") from None
                    raise
                received += len(chunk)
                bar.update(len(chunk))
                elapsed, deadline = time.monotonic() - start, GRACE_S + (total or received) / MIN_RATE
                if elapsed > deadline:
                    raise DataError(f"--download: {url} is too slow: {received:,} of {_size(total)} in {elapsed:.0f} "
                                    f"s, past its deadline of {deadline:.0f} s (at least {MIN_RATE // 1000} kB/s on "
                                    f"average); rerun later, or download it by hand to {dest.parents[1] / dest.name} "
                                    f"and rerun")
    if length and received != length:
        raise DataError(f"--download: the transfer of {url} was cut short ({received:,} of {length:,} bytes "
                        f"arrived); nothing was kept: rerun to fetch it again, or download it by hand to "
                        f"{dest.parents[1] / dest.name} and rerun")


class UnsafeArchive(DataError):
    """An archive member that would be written outside its folder, or is a link or a device."""


def _unsafe_name(name: str) -> str:
    """Why an archive member's name must not be unpacked ("" if it may): absolute, or with a '..' part."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute name"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a '..' in its name, which leads out of the folder"
    return ""


def _unsafe_zip_member(info: zipfile.ZipInfo) -> str:
    """Why a zip member must not be unpacked ("" if it may): an absolute name, a '..', a link (zipfile would
    write it as a file holding its target), a device."""
    mode = info.external_attr >> 16
    if _unsafe_name(info.filename):
        return _unsafe_name(info.filename)
    if stat.S_ISLNK(mode):
        return "a link, which a zip cannot hold safely"
    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "a device, pipe or socket"
    return ""


def _tar_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (no links out of the folder, no devices), and absolute names refused, not made
    relative as that filter does."""
    why = _unsafe_name(member.name)
    if why:
        raise UnsafeArchive(f"member {member.name!r} has {why}")
    if member.isdev():
        raise UnsafeArchive(f"member {member.name!r} is a device or pipe")
    try:
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError as e:
        raise UnsafeArchive(f"member {member.name!r} is refused: {e}") from None


def unpack_archive(path: Path, into: Path):
    """A .tar(.gz, .tgz, ...) or .zip unpacked inside `into` only, or UnsafeArchive naming the first member that
    would leave it (an absolute name, '..', a link out of it) or is a device: tarfile's "data" filter for a tar,
    the same rules for a zip, whose members are all checked before any is written. The caller removes what was
    unpacked before a refusal."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            for info in infos:
                why = _unsafe_zip_member(info)
                if why:
                    raise UnsafeArchive(f"member {info.filename!r} has {why}")
            needed = sum(i.file_size for i in infos)
            if shutil.disk_usage(into).free < needed:
                raise no_room(into / path.name, needed, "--root")
            z.extractall(into)
        return
    with tarfile.open(path) as tar:
        tar.extractall(into, filter=_tar_filter)


def _unpack(plan: DatasetDownload, files: list[Path], staging: Path) -> Path:
    """staging/build/ made afresh from the fetched files: archives unpacked (also those inside them), the split
    file copied, folders renamed to CoOp's names. A file that cannot be unpacked is deleted (fetched again next
    run); one that holds a member leading out of its folder is refused and kept for the user to inspect; either
    way nothing of the unpack is kept."""
    build = staging / "build"
    shutil.rmtree(build, ignore_errors=True)
    steps = [(path, build / remote.into, remote.url, False) for remote, path in zip(plan.files, files)]
    steps += [(build / inner, build / into, f"{inner} in the download", True) for inner, into in plan.unpack]
    try:
        for path, into, source, inner in steps:
            into.mkdir(parents=True, exist_ok=True)
            _unpack_one(path, into, source, inner)
        for old, new in plan.rename:
            os.rename(build / old, build / new)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return build


def _unpack_one(path: Path, into: Path, source: str, inner: bool):
    """One fetched file into `into`: a .json copied, an archive unpacked (an inner one then deleted)."""
    try:
        if path.suffix == ".json":
            shutil.copyfile(path, into / path.name)
            return
        print(f"unpacking {path.name}", flush=True)
        if not inner and shutil.disk_usage(into).free < path.stat().st_size:
            raise no_room(into / path.name, path.stat().st_size, "--root")  # images hardly compress
        unpack_archive(path, into)
        if inner:
            path.unlink()
    except UnsafeArchive as e:
        kept = "" if inner else f"; the archive is kept at {path} for you to inspect (delete it to download it again)"
        raise DataError(f"--download: {path.name} from {source} would write outside {into}: its {e}; nothing of it "
                        f"was kept unpacked{kept}") from None
    except DataError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno in FULL:
            raise DataError(f"--download: the disk of {into} filled up while unpacking {path.name} "
                            f"({mib(shutil.disk_usage(into).free)} free; it needs more than the "
                            f"{mib(path.stat().st_size)} of the archive): free some space or choose another --root, "
                            f"then rerun; nothing of it was kept unpacked") from None
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS):
            raise DataError(f"--download: cannot unpack {path.name} into {into} ({_reason(e)}); choose another "
                            f"--root, then rerun") from None
        path.unlink(missing_ok=True)
        raise DataError(f"--download: cannot unpack {path.name} from {source} ({_reason(e)}): it is damaged or "
                        f"incomplete and was deleted; rerun to fetch it again") from None
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
