"""Support module: safe file writing, shared by every script (off the method's reading path).

Two rules keep long jobs from losing or corrupting data:
  - a whole file is written to a temporary file in the same folder and renamed into place
    (`atomic_path`, `write_atomic`): a crash, a full disk or a reader racing the writer never sees
    half a manifest, model or checkpoint;
  - a growing result file is JSONL appended in whole lines, flushed and fsynced per batch
    (`append_jsonl`), and read back with `read_jsonl(repair=True)`: a kill mid-append leaves at most
    one partial last line, which is cut off and redone. Any other bad line is corruption and stops.
Temporary files are removed when a write fails, when SIGTERM arrives during one (`sigterm_exits`)
and, for what a SIGKILL left behind, by the next run (`remove_temporary`). New files follow the
umask.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path


class WriteError(OSError):
    """A write that failed (e.g. a full disk); the temporary file is already removed."""


def umask() -> int:
    """The process umask. It can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode open() gives a new file: 0666 minus the umask. mkstemp makes its files 0600, which
    would keep other users (a shared group, a web server) from reading our outputs."""
    return 0o666 & ~umask()


@contextlib.contextmanager
def atomic_path(path, what: str | None = None):
    """Yield a temporary path next to `path`; when the block ends without error it is fsynced and
    renamed onto `path`, else removed. `what` turns an OSError (a full disk) into one WriteError
    line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, new_file_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())  # again: a writer may have replaced the file (safetensors)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if what is not None and isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"{what}: {e}") from None
        raise


@contextlib.contextmanager
def staged_folder(out, what: str | None = None):
    """Yield a temporary folder inside `out`; when the block ends without error every file in it is
    renamed into `out` (a folder only if `out` has none of that name yet), else it is removed. For
    writers that make several files at once (a tokenizer's save_pretrained)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".staged.", suffix=".tmp"))
    with temporary_folder(tmp, what):
        yield tmp
        for item in sorted(tmp.iterdir()):
            if not (item.is_dir() and (out / item.name).exists()):
                os.replace(item, out / item.name)


@contextlib.contextmanager
def atomic_folder(path, what: str | None = None):
    """Like atomic_path for a whole folder: yield a temporary folder next to `path`, renamed onto
    `path` when the block ends without error, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700; mkdir would not
    with temporary_folder(tmp, what):
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def temporary_folder(tmp: Path, what: str | None):
    """`tmp` is removed however the block ends (after a rename it is gone already); an OSError
    (a full disk) becomes one WriteError naming `what`."""
    try:
        yield
    except OSError as e:
        if what is not None and not isinstance(e, WriteError):
            raise WriteError(f"{what}: {e}") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporary(folder) -> int:
    """Delete the temporary files (and folders) our writers leave only when killed outright
    (SIGKILL, power loss): `.NAME.XXXXXXXX.tmp`. Call it only while holding the folder's lock, so
    no running writer's file goes. Returns how many were removed."""
    found = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for item in found:
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                item.unlink()
    return len(found)


@contextlib.contextmanager
def sigterm_exits():
    """Inside the block SIGTERM (what `kill`, schedulers and torchrun send first) raises SystemExit
    instead of ending the process on the spot: `finally` clauses run, so a write in progress
    removes its temporary file and locks are released. Exit status 143 (128 + 15), as before."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_atomic(path, lines, what: str | None = None) -> None:
    """Write a whole text file (an iterable of strings; gzip if the name ends in .gz) or nothing."""
    with atomic_path(path, what) as tmp:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(tmp, "wt", encoding="utf-8") as f:
            f.writelines(lines)


def json_line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def append_jsonl(path, rows) -> None:
    """Append whole lines, then fsync: after a kill the file holds whole batches plus at most one
    partial line, which `read_jsonl(repair=True)` removes. A failed write (a full disk) is cut back
    to the last whole batch and raises WriteError naming the file. Unbuffered, so nothing is left
    to flush (and half-written) after the cut."""
    data = memoryview("".join(json_line(row) for row in rows).encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise WriteError(f"could not append to {path}: {e}") from None
    finally:
        os.close(fd)


def read_jsonl(path, repair: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a missing file is empty.

    Any line that is not a JSON object is an error naming file and line: nothing is skipped
    silently.
    `repair` is for files we append to: a last line without its newline is what a kill during
    `append_jsonl` leaves, so it is cut off the file (the caller redoes it). Without `repair` (input
    files written by people) a last line without a newline is an ordinary line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    cut = raw.rfind(b"\n") + 1
    if repair and cut < len(raw):
        print(f"{path}: dropping a partial last line ({len(raw) - cut} bytes) left by an "
              "interrupted run; it will be redone", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
            os.fsync(f.fileno())
        raw = raw[:cut]
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: a line must be a JSON object")
        rows.append((lineno, obj))
    return rows
