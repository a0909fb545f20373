"""Files a command reads and writes safely: torch files read with weights_only and one line for any that cannot
be read, files known by their content (a sha256 read again only on doubt), atomic writes (a file is complete or
untouched), the lock that makes parallel writers take turns, the removal of the temporary files that killed
writers left, and the checks an output gets before any work (it destroys no input, it can be written, its disk
has room)."""
import errno
import glob
import hashlib
import os
import pickle
import re
import shutil
import socket
import stat
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from fewshot.errors import DataError

# ----------------------------------------------------------------------------- reading

def node_kind(path) -> str | None:
    """What `path` is when it is neither a regular file nor a folder ("a named pipe (FIFO)", "a socket", "a
    device"); None for a file, a folder, or nothing there. Asked with stat, which never blocks."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def check_regular(path, what: str):
    """Before `path` is opened: one line if it is a pipe, socket or device, which open() or read() could wait on
    forever (a FIFO blocks until someone writes into it). A missing path is left to the caller to report."""
    kind = node_kind(path)
    if kind:
        raise DataError(f"{what} {path} is {kind}, not a regular file, and is not opened (reading it could wait "
                        f"forever); give a regular file")


def load_torch_file(path, what: str, mmap: bool = False):
    """torch.load(path) on the CPU with weights_only=True, or one DataError line naming `what` and `path`.

    For any file a user hands over (a features file, a checkpoint): a missing path, an empty or truncated
    file, or one torch.save did not write (text, an image, a plain pickle) each end in one line, e.g.
    "checkpoint runs/seed1.pt is truncated or not a file written by torch.save (...)", not a traceback.
    mmap=True maps the tensors instead of reading them (for files in torch.save's default zip format; others
    are read), so a large file's small entries are cheap to look at.
    """
    path = Path(path)
    check_regular(path, what)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist" + (" as a file (it is a folder)" if path.is_dir() else ""))
    is_zip = zipfile.is_zipfile(path)  # torch.save's format since torch 1.6; False for a truncated one
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except OSError as e:
        if e.errno is not None:  # the file system's fault (permissions, an I/O error), not the file's
            raise DataError(f"cannot read {what} {path}: {e.strerror}; check its permissions") from None
        raise DataError(f"{what} {path} is truncated or not a file written by torch.save "
                        f"({type(e).__name__})") from None
    except Exception as e:
        first = str(e).strip().split("\n")[0].split(". ")[0]  # torch's messages go on for lines
        reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
        if is_zip and isinstance(e, pickle.UnpicklingError):
            raise DataError(f"{what} {path} holds objects other than tensors and plain Python containers, "
                            f"which are not loaded (torch.load weights_only=True; {reason})") from None
        raise DataError(f"{what} {path} is truncated or not a file written by torch.save ({reason})") from None


# ----------------------------------------------------------------------------- a file's content

def file_sha256(path) -> str:
    """The sha256 (hex) of a file's bytes; one line for a pipe, socket or device, which is never read."""
    check_regular(path, "file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stat_of(path) -> list[int]:
    """What tells that a file was not touched since it was last hashed: [size, mtime_ns, ctime_ns, inode]. The
    ctime changes with every write and every utime() (which can put an mtime back), a copy or a move to another
    file system gets a new inode: any of them changed is a doubt, and the file is hashed again."""
    s = os.stat(path)
    return [s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino]


def fingerprints(paths, known: dict | None = None) -> dict:
    """{path: (sha256, stat)} of each file (stat_of); (None, None) for one that cannot be read (the caller says
    why, for all of them at once). known: such a dict from an earlier record, whose sha256 a file keeps, unread,
    while its stat is the one recorded; every other file is read and hashed (threads overlap the reads on a slow
    file system)."""
    def stat(p):
        try:
            return stat_of(p)
        except OSError:
            return None

    def sha256(p):
        try:
            return None if node_kind(p) else file_sha256(p)  # a pipe would block the read for ever
        except OSError:
            return None
    known = known or {}
    stats = {p: stat(p) for p in paths}
    doubt = [p for p in paths if stats[p] is None or p not in known or list(known[p][1]) != stats[p]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        hashed = dict(zip(doubt, pool.map(sha256, doubt)))
    return {p: (hashed[p] if p in hashed else known[p][0], stats[p]) if stats[p] is not None else (None, None)
            for p in paths}


# ----------------------------------------------------------------------------- writing safely

def file_lock(path) -> FileLock:
    """An exclusive lock on `path` across processes, held in a hidden `.<name>.lock` file beside it.

    `with file_lock(path): check, then write` makes parallel jobs on one file (one per seed or per GPU on a
    cluster) take turns, so that none replaces a file another has just checked or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(f".{path.name}.lock"))


def acquire(lock: FileLock, path: Path):
    """lock.acquire() for a `with`, saying what it waits for when another process holds the lock."""
    try:
        return lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process to finish writing {path}", flush=True)
        return lock.acquire()


STALE_TEMP_SECONDS = 24 * 3600  # a writer keeps writing its temporary file: one untouched for a day is dead


def _alive(pid: int) -> bool:
    """True if process `pid` of this host runs (or might: when it cannot be asked)."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temps(path: Path):
    """Delete the temporary files that killed writes of `path` left (kill -9, power cut: no `finally` ran).

    Only files of write_atomic's naming, .NAME.HOST.PID.tmp, and only a dead writer's: a process of this host
    that no longer runs, or any file untouched for a day (the PID since reused, another host writing to a
    shared folder). A live writer's file is never removed.
    """
    host, named = socket.gethostname(), re.compile(rf"\.{re.escape(path.name)}\.(?:(.+)\.)?(\d+)\.tmp")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = named.fullmatch(tmp.name)
        try:
            if match and ((match[1] == host and not _alive(int(match[2])))
                          or time.time() - tmp.stat().st_mtime > STALE_TEMP_SECONDS):
                tmp.unlink()
        except FileNotFoundError:  # another process cleaned it up first
            pass


FULL = (errno.ENOSPC, errno.EDQUOT)  # the disk, or the user's quota on it, is full


def mib(n: float) -> str:
    """A size for a person: 12.3 KiB, 45.6 MiB, 7.8 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1024:,.1f} KiB"


def no_room(path, needed_bytes: int | None, flag: str) -> DataError:
    """The line for a disk without room for `path`: how much it needs (None: unknown, more than is free), how
    much is free, and where."""
    folder = Path(path).parent
    try:
        free = mib(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    need = f"it needs {mib(needed_bytes)}" if needed_bytes else "it needs more than is free"
    return DataError(f"no room for {path}: {need} and the disk of {folder} has {free} free; free some space there "
                     f"or choose another {flag}")


class _Recorded:
    """The file object write_atomic's `write` gets: it keeps the first OSError of a write (a full disk), which
    torch.save would turn into a RuntimeError that names no cause ("unexpected pos ...")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def write_atomic(path, write, needed_bytes: int | None = None, flag: str | None = None):
    """write(file) into a temporary file beside `path`, then rename it: `path` is complete or untouched.

    The temporary file is .NAME.HOST.PID.tmp; those of earlier writes that were killed are removed first. A
    write that fails raises its OSError (a full disk: ENOSPC), also from inside torch.save. With needed_bytes
    (what the file will take) and flag (the option that chooses where it goes), a disk without that room is
    one DataError line saying how much is needed and where, before anything is written, and so is a disk that
    fills up during the write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    if needed_bytes is not None and shutil.disk_usage(path.parent).free < needed_bytes:
        raise no_room(path, needed_bytes, flag)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    recorded = None
    try:
        with open(tmp, "wb") as f:  # a file object, not a name: torch.save would store the temporary name
            recorded = _Recorded(f)
            write(recorded)
        os.replace(tmp, path)
    except Exception as e:
        cause = recorded.error if recorded and recorded.error else e if isinstance(e, OSError) else None
        if cause is None:
            raise
        if needed_bytes is not None and cause.errno in FULL:
            raise no_room(path, needed_bytes, flag) from None
        if cause is e:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _same_or_inside(path: Path, other: Path) -> bool:
    """True if `path` is the file or folder `other` (through links too), or lies inside the folder `other`."""
    a, b = Path(os.path.realpath(path)), Path(os.path.realpath(other))
    if a == b or b in a.parents:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)   # a hard link
    except OSError:
        return False


def check_output(flag, path, inputs, folder=False, needed_bytes=1 << 20):
    """Before any work: `path` (a file, or a folder with folder=True) can receive the output of `flag` without
    destroying anything. It is none of the run's `inputs` ({description: path}; for a folder input, nothing
    inside it), not a device, pipe or socket, not a folder where a file goes (or the reverse), writable, its
    name (and write_atomic's temporary one) not too long, and its disk has `needed_bytes` free."""
    path = Path(path)
    for what, source in inputs.items():
        if source is not None and _same_or_inside(path, source):
            raise DataError(f"{flag} {path} is {what} {source}, an input of this run, which writing there would "
                            f"destroy; choose another path")
    if path.exists() and not (path.is_dir() if folder else path.is_file()):
        kind = ("a folder" if path.is_dir() else "a file" if path.is_file()
                else "not a regular file (a device, a pipe or a socket)")
        raise DataError(f"{flag} {path} is {kind}; give {'a folder' if folder else 'a file name'} there instead")
    target = path if folder else path.parent
    blocking = next((p for p in (target, *target.parents) if p.exists() or p.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise DataError(f"{flag} {path} cannot be written: {blocking} is a file, not a folder; choose another path")
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        longest = os.pathconf(target, "PC_NAME_MAX")
        free = shutil.disk_usage(target).free
    except OSError as e:
        raise DataError(f"{flag} {path} cannot be written: {e.strerror}; choose another path") from None
    temporary = f".{'seed000.pt' if folder else path.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    if len(temporary.encode()) > longest:
        raise DataError(f"{flag} {path}: the name is too long for this file system (at most {longest} bytes with "
                        f"its temporary suffix); choose a shorter one")
    if free < needed_bytes:
        raise DataError(f"{flag} {path}: only {free / 2**20:.1f} MiB free on its disk, {needed_bytes / 2**20:.1f} MiB "
                        f"needed; free some space or choose another path")

