"""--download: the real download code (the transfer, the unpacking, our checks and layout) against a local HTTP
server on 127.0.0.1 that serves small archives built here (fewshot/testing/servers.py), and what a rerun does
after each fault. Google Drive's own protocol (gdown's part) is not exercised: torchvision hands
drive.google.com URLs to gdown, which cannot be pointed at a local server; a stand-in gdown checks the hand-over,
and what is done with the file it writes. The faults that end in one line (an unsafe archive, no network, a
trickle, a hand-placed file of another checksum, a full disk, ...) are cases of the bad-input registry."""
import errno
import hashlib
import importlib.machinery
import io
import json
import sys
import tarfile
import types
import urllib.request
from pathlib import Path

import pytest
import torch

import fewshot.datasets as fd
from fewshot import backbones, cli, datasets, download
from fewshot.errors import DataError
from fewshot.testing.fixtures import TINY_NAMES, write_dataset
from fewshot.testing.servers import Server, closed_port

TINY = ["--device", "cpu", "--workers", "0", "--seeds", "1", "--views", "1"]
VIT = TINY_NAMES["vit"]  # the name of the tiny ViT checkpoint, read from its weights


@pytest.fixture
def server():
    with Server() as s:
        yield s


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tar_gz(folder: Path, arcname: str) -> bytes:
    """folder packed as arcname/... in a .tar.gz, as DTD's archive holds dtd/..."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dtd_files(tmp_path_factory):
    """A small DTD as its two downloads: the archive of dtd/ (images, no split) and CoOp's split file."""
    root = write_dataset(tmp_path_factory.mktemp("source"), "dtd")
    split = root / "dtd" / fd.DATASETS["dtd"].split
    split_bytes = split.read_bytes()
    split.unlink()
    return {"/dtd-r1.0.1.tar.gz": tar_gz(root / "dtd", "dtd"), "/split.json": split_bytes}


def serve_dtd(monkeypatch, server, files, md5s=None):
    """DOWNLOADS["dtd"] pointing at the server (as the real row: split file first, then the archive into root)."""
    server.files.update(files)
    md5s = md5s or {}
    split = download.Remote(f"{server.url}/split.json", md5s.get("split", md5(files["/split.json"])), "dtd",
                            "split_zhou_DescribableTextures.json")
    archive = download.Remote(f"{server.url}/dtd-r1.0.1.tar.gz",
                              md5s.get("archive", md5(files["/dtd-r1.0.1.tar.gz"])), "")
    monkeypatch.setitem(download.DOWNLOADS, "dtd", download.DatasetDownload((split, archive)))
    return split, archive


def nothing_passes_for_the_dataset(root: Path):
    """No dataset folder, so load_splits finds nothing; what is left is the lock and the staging folder."""
    assert not (root / "dtd").exists()
    with pytest.raises(DataError, match="dataset folder not found"):
        fd.load_splits("dtd", root)
    assert {p.name for p in root.iterdir()} <= {".dtd.lock", "dtd.download"}


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_success_lays_out_coops_layout_and_a_second_run_fetches_nothing(server, dtd_files, monkeypatch, tmp_path,
                                                                        capsys):
    serve_dtd(monkeypatch, server, dtd_files)
    root = tmp_path / "data"
    assert download.download_dataset("dtd", root) == root / "dtd"
    splits = fd.load_splits("dtd", root)
    reference = fd.load_splits("dtd", write_dataset(tmp_path / "reference", "dtd"))
    assert splits.classnames == reference.classnames and splits.coop_split() == reference.coop_split()
    assert all((splits.images / p).is_file() for p, _ in splits.train + splits.val + splits.test)
    assert sorted(p.name for p in root.iterdir()) == [".dtd.lock", "dtd"]   # the staging folder is gone
    out, err = capsys.readouterr()
    assert f"downloading {server.url}/split.json" in out and "downloaded dtd into" in out
    assert "B/s" not in err and "%|" not in err          # no progress bar when the output is no terminal
    hits = dict(server.hits)
    download.download_dataset("dtd", root)               # there already: nothing is fetched
    assert server.hits == hits


@pytest.mark.parametrize("fault", [500, 404])
def test_a_server_error_names_the_url_and_a_rerun_succeeds(server, dtd_files, monkeypatch, tmp_path, fault):
    _, archive = serve_dtd(monkeypatch, server, dtd_files)
    server.faults["/dtd-r1.0.1.tar.gz"] = fault
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        download.download_dataset("dtd", root)
    assert one_line(e) == (f"--download: cannot download {archive.url} (HTTP Error {fault}: "
                           f"{'Not Found' if fault == 404 else 'Internal Server Error'}); check the connection and "
                           f"rerun, or download it by hand to {root / 'dtd.download' / archive.name} and rerun")
    nothing_passes_for_the_dataset(root)
    del server.faults["/dtd-r1.0.1.tar.gz"]
    split_hits = server.hits["/split.json"]
    download.download_dataset("dtd", root)
    assert fd.load_splits("dtd", root).test
    assert server.hits["/split.json"] == split_hits       # the split file, checked the first time, was kept


def test_a_wrong_checksum_keeps_nothing_of_that_file(server, dtd_files, monkeypatch, tmp_path):
    _, archive = serve_dtd(monkeypatch, server, dtd_files, md5s={"archive": "0" * 32})
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        download.download_dataset("dtd", root)
    assert one_line(e).startswith(f"--download: {archive.url} has md5 {md5(dtd_files['/dtd-r1.0.1.tar.gz'])}, not "
                                  f"the pinned {'0' * 32} (a transfer cut short, or the file changed at its source); "
                                  f"nothing was kept")
    nothing_passes_for_the_dataset(root)
    assert [p.name for p in (root / "dtd.download").rglob("*") if p.is_file()] == [
        "split_zhou_DescribableTextures.json"]          # only the checked split file
    serve_dtd(monkeypatch, server, dtd_files)           # the right checksum: the rerun succeeds
    download.download_dataset("dtd", root)
    assert fd.load_splits("dtd", root).test


@pytest.mark.parametrize("pinned", [True, False])
def test_a_transfer_cut_short_is_caught_and_nothing_of_it_kept(server, dtd_files, monkeypatch, tmp_path, pinned):
    """The server announces the whole length and sends half: the transfer itself sees it, pinned or not."""
    _, archive = serve_dtd(monkeypatch, server, dtd_files, md5s=None if pinned else {"archive": None})
    server.faults["/dtd-r1.0.1.tar.gz"] = "short"
    root = tmp_path / "data"
    size = len(dtd_files["/dtd-r1.0.1.tar.gz"])
    with pytest.raises(DataError) as e:
        download.download_dataset("dtd", root)
    assert one_line(e).startswith(f"--download: the transfer of {archive.url} was cut short ({size // 2:,} of "
                                  f"{size:,} bytes arrived); nothing was kept: rerun")
    nothing_passes_for_the_dataset(root)
    assert not (root / "dtd.download" / archive.name).exists() and not (root / "dtd.download" / "partial").exists()
    del server.faults["/dtd-r1.0.1.tar.gz"]
    download.download_dataset("dtd", root)
    assert fd.load_splits("dtd", root).test


def test_an_archive_that_does_not_unpack_is_deleted_for_the_rerun(server, dtd_files, monkeypatch, tmp_path):
    """An unpinned archive that arrives whole but is not one (the host changed it): deleted, fetched again."""
    _, archive = serve_dtd(monkeypatch, server, {**dtd_files, "/dtd-r1.0.1.tar.gz": b"not an archive"},
                           md5s={"archive": None})
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        download.download_dataset("dtd", root)
    assert one_line(e).startswith(f"--download: cannot unpack dtd-r1.0.1.tar.gz from {archive.url} (")
    assert one_line(e).endswith("it is damaged or incomplete and was deleted; rerun to fetch it again")
    assert not (root / "dtd.download" / archive.name).exists()
    server.files["/dtd-r1.0.1.tar.gz"] = dtd_files["/dtd-r1.0.1.tar.gz"]
    download.download_dataset("dtd", root)
    assert fd.load_splits("dtd", root).test


def test_an_unpinned_file_whose_dataset_is_incomplete_is_deleted(server, dtd_files, monkeypatch, tmp_path):
    split = json.loads(dtd_files["/split.json"])
    split["test"].append(["banded/not_in_the_archive.jpg", 0, split["test"][0][2]])
    serve_dtd(monkeypatch, server, {**dtd_files, "/split.json": json.dumps(split).encode()}, md5s={"split": None})
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        download.download_dataset("dtd", root)
    assert one_line(e) == ("--download: the downloaded dtd is not complete (1 images of its split are not in the "
                           "downloaded files, e.g. banded/not_in_the_archive.jpg); split_zhou_DescribableTextures.json "
                           "(not pinned by a checksum) deleted: rerun, and report it if it persists")
    nothing_passes_for_the_dataset(root)
    assert not (root / "dtd.download" / "split_zhou_DescribableTextures.json").exists()
    assert (root / "dtd.download" / "dtd-r1.0.1.tar.gz").is_file()   # pinned and checked: kept for the rerun


def test_offline_every_file_is_listed_and_files_put_there_by_hand_are_used(server, dtd_files, monkeypatch, tmp_path,
                                                                          capsys, run, tripwire,
                                                                          tiny_vit_checkpoint):
    """--download without a network lists every file still needed with the exact path to put it at, before CLIP
    or anything else is loaded; the files put there by hand (here: the right ones) are checked and used by the
    rerun, still without a network."""
    serve_dtd(monkeypatch, server, dtd_files)
    port = closed_port()
    monkeypatch.setitem(download.DOWNLOADS, "dtd", download.DatasetDownload(tuple(
        download.Remote(r.url.replace(server.url, f"http://127.0.0.1:{port}"), r.md5, r.into, r.filename)
        for r in download.DOWNLOADS["dtd"].files)))
    root = tmp_path / "data"
    wire = tripwire(backbones, "load", "CLIP was loaded before the download")
    argv = ["--dataset", "dtd", "--root", root, "--download", "--clip-checkpoint", tiny_vit_checkpoint, *TINY,
            "--shots", 1, "--max-shots", 1, "--epochs", 0]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.train_command([*map(str, argv)])
    out, err = capsys.readouterr()
    assert err.startswith(f"error: --download: cannot reach http://127.0.0.1:{port}/split.json (")
    paths = [Path(line.split("-> ")[1].split("  (")[0]) for line in out.splitlines() if "-> " in line]
    assert [p.name for p in paths] == ["split_zhou_DescribableTextures.json", "dtd-r1.0.1.tar.gz"]
    assert all(p.parent == (root / "dtd.download").absolute() and not p.exists() for p in paths)
    nothing_passes_for_the_dataset(root)
    for path, served in zip(paths, ("/split.json", "/dtd-r1.0.1.tar.gz")):    # downloaded by hand elsewhere
        path.write_bytes(dtd_files[served])
    assert download.download_dataset("dtd", root) == root / "dtd" and fd.load_splits("dtd", root).test
    assert "fetched before or put there by hand" in capsys.readouterr().out
    wire.proven(lambda: run(*argv))                     # now the run gets as far as loading CLIP


def test_what_an_interrupted_run_left_is_cleared_by_the_next(server, dtd_files, monkeypatch, tmp_path):
    serve_dtd(monkeypatch, server, dtd_files)
    staging = tmp_path / "data" / "dtd.download"
    (staging / "partial").mkdir(parents=True)
    (staging / "partial" / "dtd-r1.0.1.tar.gz").write_bytes(dtd_files["/dtd-r1.0.1.tar.gz"][:100])  # a cut transfer
    (staging / "build" / "dtd" / "images").mkdir(parents=True)                     # a half unpacked build
    download.download_dataset("dtd", tmp_path / "data")
    assert fd.load_splits("dtd", tmp_path / "data").test and not staging.exists()


def test_an_unsafe_archive_leaves_nothing_unpacked_and_is_kept_to_inspect(server, dtd_files, monkeypatch, tmp_path):
    """A member named ../../../ESCAPED: refused before it is written, the members unpacked before it removed, the
    archive kept where it was fetched (the registry's tar-* and zip-* cases check the one line)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("dtd/images/first.txt"), io.BytesIO(b""))    # unpacked, then removed
        escaped = tarfile.TarInfo("../../../ESCAPED_BY_TAR")
        escaped.size = 3
        tar.addfile(escaped, io.BytesIO(b"bad"))
    serve_dtd(monkeypatch, server, {**dtd_files, "/dtd-r1.0.1.tar.gz": buffer.getvalue()})
    root = tmp_path / "a" / "b" / "data"
    with pytest.raises(DataError, match=r"would write outside .*'\.\./\.\./\.\./ESCAPED_BY_TAR'.* the archive is kept"):
        download.download_dataset("dtd", root)
    assert not list(tmp_path.rglob("ESCAPED*")) and not (root / "dtd.download" / "build").exists()
    assert (root / "dtd.download" / "dtd-r1.0.1.tar.gz").read_bytes() == buffer.getvalue()


def test_a_full_disk_while_writing_says_where_and_how_much(server, dtd_files, monkeypatch, tmp_path):
    """The disk fills up during the transfer (ENOSPC from the write, after the check of room passed)."""
    serve_dtd(monkeypatch, server, dtd_files)
    real_open = open

    class Full:  # a file on a disk that is full: its first write fails
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(download, "open", lambda path, mode="r": Full(real_open(path, mode)) if
                        Path(path).name == "dtd-r1.0.1.tar.gz" else real_open(path, mode), raising=False)
    size = len(dtd_files["/dtd-r1.0.1.tar.gz"])
    with pytest.raises(DataError, match=rf"^no room for .*dtd.download/dtd-r1.0.1.tar.gz: it needs "
                                        rf"{size / 1024:.1f} KiB and the disk of .* free; free some space there or "
                                        rf"choose another --root$"):
        download.download_dataset("dtd", tmp_path / "data")
    assert not (tmp_path / "data" / "dtd.download" / "partial").exists()


def test_a_missing_gdown_is_named_before_any_transfer(server, dtd_files, monkeypatch, tmp_path):
    split, _ = serve_dtd(monkeypatch, server, dtd_files)
    drive = download.Remote(download._drive("an-id"), None, "dtd", split.filename)
    monkeypatch.setitem(download.DOWNLOADS, "dtd",
                        download.DatasetDownload((drive,) + download.DOWNLOADS["dtd"].files[1:]))
    monkeypatch.setattr(download.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"^--download: dtd's split_zhou_DescribableTextures.json is on Google Drive "
                                           r"\(https://drive.google.com/file/d/an-id/view\), which needs the gdown "
                                           r"package: pip install gdown"):
        download.download_dataset("dtd", tmp_path)
    assert server.hits == {}


def test_a_google_drive_file_goes_to_gdown_and_is_checked_like_the_others(server, dtd_files, monkeypatch, tmp_path):
    """torchvision's download_url sends a Drive URL to gdown.download(id=..., output=...); a stand-in gdown serves
    it from the local server (torchvision first asks the URL for redirects: that request is skipped here)."""
    import torchvision.datasets.utils as tv
    gdown = types.ModuleType("gdown")
    gdown.__spec__ = importlib.machinery.ModuleSpec("gdown", None)
    asked = []

    def fetch(id, output, quiet, user_agent):
        asked.append(id)
        with urllib.request.urlopen(f"{server.url}/drive/{id}") as response, open(output, "wb") as f:
            f.write(response.read())
    gdown.download = fetch
    monkeypatch.setitem(sys.modules, "gdown", gdown)
    monkeypatch.setattr(tv, "_get_redirect_url", lambda url, max_hops: url)
    split, archive = serve_dtd(monkeypatch, server, dtd_files)
    server.files["/drive/the-split-id"] = dtd_files["/split.json"]
    drive = download.Remote(download._drive("the-split-id"), split.md5, "dtd", split.filename)
    monkeypatch.setitem(download.DOWNLOADS, "dtd", download.DatasetDownload((drive, archive)))
    server.faults["/drive/the-split-id"] = 500
    with pytest.raises(DataError) as e:
        download.download_dataset("dtd", tmp_path)
    assert one_line(e).startswith(f"--download: cannot download {drive.url} (HTTP Error 500: Internal Server Error)")
    nothing_passes_for_the_dataset(tmp_path)
    del server.faults["/drive/the-split-id"]
    download.download_dataset("dtd", tmp_path)
    assert asked == ["the-split-id"] * 2 and fd.load_splits("dtd", tmp_path).test


def test_the_pinned_table_lays_out_coops_layout():
    """Every dataset either downloads or has steps; each download brings CoOp's split file into its folder."""
    assert set(download.DOWNLOADS) | set(download.MANUAL) == set(fd.DATASETS)
    assert not set(download.DOWNLOADS) & set(download.MANUAL)
    for dataset, plan in download.DOWNLOADS.items():
        spec = fd.DATASETS[dataset]
        assert all(r.url.startswith(("https://", "http://")) and (r.md5 is None or len(r.md5) == 32)
                   for r in plan.files)
        assert len({r.name for r in plan.files}) == len(plan.files)
        if spec.split:  # the split file: first (small, fetched before the images), into the dataset's folder
            assert (plan.files[0].name, plan.files[0].into) == (spec.split, spec.folder)


def test_train_py_downloads_extracts_and_trains_in_one_command(server, dtd_files, monkeypatch, tmp_path, fail, run,
                                                               tiny_vit_checkpoint):
    """The README's main command, `train.py --dataset dtd --shots 16 --download`, on the local server."""
    _, archive = serve_dtd(monkeypatch, server, dtd_files)
    argv = ["--dataset", "dtd", "--root", tmp_path / "data", "--download", "--shots", 2, "--max-shots", 2,
            "--epochs", 1, "--clip-checkpoint", tiny_vit_checkpoint, *TINY]
    server.faults["/dtd-r1.0.1.tar.gz"] = 500
    assert fail(*argv) == (f"error: --download: cannot download {archive.url} (HTTP Error 500: Internal Server "
                           f"Error); check the connection and rerun, or download it by hand to "
                           f"{tmp_path / 'data' / 'dtd.download' / archive.name} and rerun")
    del server.faults["/dtd-r1.0.1.tar.gz"]
    results = run(*argv)
    assert results["dataset"] == "dtd" and torch.load(tmp_path / "features" / f"dtd_{VIT}.pt",
                                                      weights_only=True)["test"]


def test_a_dataset_there_already_is_not_fetched_whatever_its_size(tmp_path, tripwire):
    """A manual dataset that is there is returned without being read (ImageNet's 1.3M files); a downloadable one
    is loaded once to say, if it cannot be, that --download will not replace it."""
    root = write_dataset(tmp_path, "imagenet")
    wire = tripwire(datasets, "load_splits", "read")
    assert download.download_dataset("imagenet", root) == root / "imagenet"
    wire.proven(lambda: download.download_dataset("dtd", write_dataset(tmp_path / "other", "dtd")))
