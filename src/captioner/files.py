"""Files on disk: content digests and atomic writes, the one place that knows how to do either.

An atomic write goes to a temporary name beside the target, is flushed and synced, and only then
renamed over the target (``os.replace``, atomic on POSIX and Windows). A crash or a kill at any
moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from captioner.errors import ConfigError


def file_digest(path: str | Path) -> str:
    """SHA-1 of a file's bytes (names a photo's content in caches, output files and the library)."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe would block the read forever, a device never end
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def readable_digest(path: str | Path) -> str | None:
    """file_digest, or None when the file cannot be read (gone, permission denied, a folder): such
    a file is then reported by whoever opens it, never a crash here."""
    try:
        return file_digest(path)
    except OSError:
        return None


def path_text(path: str | Path) -> str:
    """A path as text that any UTF-8 file or database can hold. A file name that is not valid UTF-8
    (Latin-1 'caf\\xe9.jpg' from an old camera or a Windows share) would make writing fail; its
    undecodable bytes are shown as \\xNN instead. The same path always gives the same text, so it
    serves as the key by which output files and the library recognise a photo."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kw) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; when the block ends without an error, sync
    it and rename it to `path`. On an error the temporary file is removed and `path` is untouched.

        with atomic_write(out / "metrics.csv", newline="") as f:
            f.write(...)
    """
    path = Path(path)
    if "w" not in mode:
        raise ValueError(f"atomic_write writes whole files; mode {mode!r} has no 'w'")
    if "b" not in mode:
        open_kw.setdefault("encoding", "utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _clear_stale_temporaries(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _clear_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of `path` that writers killed mid-write left (.NAME.<pid>.tmp whose
    process is gone): a killed checkpoint write left one for good. A live writer's is kept."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-4]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or one this system cannot ask about: leave its file
    return True


def _umask() -> int:
    """This process's umask (Linux says it in /proc; elsewhere it is set and put back at once)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Build a folder's new contents in a temporary folder beside it; when the block ends without an
    error, sync the files and swap the new folder in for the old one. On an error the temporary
    folder is removed and the old folder is untouched.

    The swap is two renames (folder -> .folder.old, temporary -> folder). A kill between them leaves
    no `folder`, only `.folder.old`: `complete_folder` (used by every reader, and here before the
    next write) puts that complete old version back."""
    folder = complete_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{glob.escape(folder.name)}.*"):  # temporary folders of a killed write
        if stale.is_dir() and stale.name != f".{folder.name}.old":
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make a model folder or an export private
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def complete_folder(folder: str | Path) -> Path:
    """`folder`, put back from `.folder.old` when a kill during `atomic_folder`'s swap left only
    that (or, where the folder cannot be renamed, the `.folder.old` to read instead)."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.is_dir():
        try:
            old.rename(folder)
        except OSError:
            return old
    return folder


@contextlib.contextmanager
def locked(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (its file ``.lock``) while the block runs, so that two
    processes never write one folder at once; a second one gets a ConfigError naming the folder.
    The lock goes with the process, however it ends (kill -9 included)."""
    with _lock(Path(folder) / ".lock", Path(folder), what, "folder"):
        yield


@contextlib.contextmanager
def locked_file(path: str | Path, what: str) -> Iterator[None]:
    """The same for one file that is rewritten by replacing it (so its own inode cannot hold the
    lock): the lock is the hidden file ``.NAME.lock`` beside it, removed when the block ends."""
    path = Path(path)
    with _lock(path.with_name(f".{path.name}.lock"), path, what, "file", remove=True):
        yield


@contextlib.contextmanager
def _lock(lock: Path, shown: Path, what: str, kind: str, remove: bool = False) -> Iterator[None]:
    """`remove`: delete the lock file when done (nothing left beside the user's file). A process
    that locked it just before it went checks that it still is the file at that path, else takes
    the new one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise ConfigError(f"{shown}: another {what} is writing to it{f' ({holder})' if holder else ''}; "
                              f"wait for it to finish or choose another {kind}") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # removed by the holder that just finished: lock the file now at that path
    with f:
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            if remove:
                lock.unlink(missing_ok=True)  # still held: no one can take it between these two lines
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
