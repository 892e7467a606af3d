"""The run directory: its names, safe writing, locks, and the refusals that protect users' files.

Everything vaelab writes goes through this room, and every rule about what may be written where
lives here (docs/reliability.md states them for users):

- a new run goes only into a missing or empty folder (``check_new_run``);
- a run directory is locked by the process that trains into it (``lock``): a second process
  is refused at once; the kernel drops the lock when its holder exits or is killed, so a lock
  left by a crash is never in the way;
- files are written to a temporary name in the same folder and renamed into place
  (``atomic_write``); after a crash only the temporaries vaelab itself names are removed
  (``remove_stale_temporaries``);
- an output file (``--out`` of sample, encode, report, ...) never replaces a run's own files,
  nor a file that vaelab did not write, unless asked to (``check_output``).

This module imports nothing else of vaelab, so every other room can use it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None  # type: ignore[assignment]

# -- names -----------------------------------------------------------------------------------
CONFIG = "config.yaml"  # the resolved config; written last when a run starts: it marks a run
MODEL_CONFIG = "config.json"  # what `vaelab.load` needs to rebuild the model
WEIGHTS = "model.safetensors"  # the weights of the last finished epoch
STATE = "state/train_state.safetensors"  # model, optimizer, RNG and counters, for resume
METRICS = "metrics.jsonl"  # one JSON row per split and epoch
EVAL = "eval"  # eval/<split>.json
FIGURES = "figures"
TENSORBOARD = "tensorboard"
SAMPLERS = "samplers"  # samplers/gmm_<K>.safetensors: post-hoc samplers fitted to the run
LOCK = ".vaelab.lock"  # held (flock) by the process that trains into the run
# Top-level names inside a run that belong to the run: no output command may write there.
RESERVED = (CONFIG, MODEL_CONFIG, WEIGHTS, METRICS, LOCK, "state", EVAL, TENSORBOARD, SAMPLERS)
# Files written with atomic_write inside a run: (folder, name pattern) of their temporaries.
_TEMPORARIES = (
    ("", re.escape(CONFIG)),
    ("", re.escape(MODEL_CONFIG)),
    ("", re.escape(WEIGHTS)),
    ("", re.escape(METRICS)),
    ("state", re.escape(Path(STATE).name)),
    (EVAL, r"(gap_|quality_)?(val|test)\.json"),
    (FIGURES, r"(curves|reconstructions|samples)\.png"),
    (SAMPLERS, r"gmm_\d+\.safetensors"),
)
# Files of the folders vaelab manages besides runs (a sweep's, the demo's): never an --out.
SWEEP, SUMMARY = "sweep.json", "summary.json"
COLLECTION_FILES = (SWEEP, SUMMARY)
# Marks written into vaelab's own PNG and HTML outputs, so a rerun may replace them.
PNG_MARK = b"tEXtSoftware\x00vaelab"
HTML_MARK = '<meta name="generator" content="vaelab">'


class RunDirError(RuntimeError):
    """A folder or file vaelab refuses to use or cannot write (message names it)."""


def is_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds a vaelab run (its config.yaml and config.json)."""
    folder = Path(folder)
    return (folder / CONFIG).is_file() and (folder / MODEL_CONFIG).is_file()


def has_checkpoint(run: str | Path) -> bool:
    """Whether a run has finished at least one epoch (weights or resume state on disk)."""
    return (Path(run) / WEIGHTS).is_file() or (Path(run) / STATE).is_file()


# -- writing ---------------------------------------------------------------------------------
def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename, so a
    crash leaves the old file or the new one, never half of one. An OSError (disk full, a
    read-only folder) becomes a RunDirError naming the file."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = _temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:  # "x": a new file, with the user's usual permissions
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"cannot write '{path}': {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_pattern(name: str) -> re.Pattern[str]:
    """The names ``atomic_write`` gives the temporaries of a file whose name matches ``name``
    (a regular expression)."""
    return re.compile(rf"\.({name})\.(?P<pid>\d+)\.[0-9a-f]{{8}}\.tmp")


def remove_stale_temporaries(run: str | Path) -> list[Path]:
    """Delete the temporaries that a killed vaelab process left in a run directory: only files
    named as ``atomic_write`` names the run's own files, never anything else. Returns them."""
    removed = []
    for folder, name in _TEMPORARIES:
        where = Path(run) / folder
        if not where.is_dir():
            continue
        pattern = temporary_pattern(name)
        for entry in where.iterdir():
            match = pattern.fullmatch(entry.name)
            if not match or entry.is_symlink() or not entry.is_file():
                continue
            if _alive(int(match.group("pid"))):
                continue  # another process (evaluate, a figure) is writing it right now
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (this one's own temporaries are never stale)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def check_writable(folder: str | Path) -> None:
    """Refuse early, before any work, if files cannot be created in ``folder`` (or, if it does
    not exist yet, in the nearest folder above it that does)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"cannot write in '{folder}': '{probe}' is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write in '{folder}': '{probe}' is not writable")


# -- locks -----------------------------------------------------------------------------------
class Lock:
    """An exclusive lock on a folder (``flock`` on a file in it), held until ``release`` or
    until the process ends, however it ends: the kernel releases it, so a crashed run never
    leaves a lock that blocks the next one."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock(folder: str | Path, name: str = LOCK, *, wait: bool = False, what: str = "") -> Lock:
    """Lock ``folder`` (creating it if missing) with the file ``name`` in it.

    ``wait=False``: refuse at once if another process holds it, naming that process's pid.
    ``wait=True``: wait for it (the preprocessing cache: the second process then finds the
    first one's result). The lock file stays (it is vaelab's own): removing a lock file that
    another process has open would let two processes hold "the" lock. A lock "file" that is a
    symbolic link or not a regular file is refused, never followed or written.
    """
    folder = Path(folder)
    path = folder / name
    while True:
        fd = _open_lock_file(folder, path)
        if fcntl is None:
            return Lock(path, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"cannot lock '{path}': {err.strerror or err}") from None
            holder = _read_pid(path)
            by = f"process {holder}" if holder else "another process"
            raise RunDirError(
                f"'{folder}' is in use by {by}{' ' + what if what else ''}: wait for it to "
                "finish, or choose another folder"
            ) from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed (a run cleaned up) while we waited: lock anew
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return Lock(path, fd)


def _open_lock_file(folder: Path, path: Path) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        if path.is_symlink():
            raise RunDirError(f"'{path}' is a symbolic link, not vaelab's lock file") from None
        raise RunDirError(f"cannot write in '{folder}': {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError(f"'{path}' is not a regular file, so not vaelab's lock file")
    return fd


def is_lock_file(entry: Path) -> bool:
    """Whether ``entry`` is a lock file vaelab could have made (a regular file, not a link)."""
    try:
        return entry.name == LOCK and stat.S_ISREG(os.stat(entry, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


# -- refusals --------------------------------------------------------------------------------
def folder_arg(out: str | Path, option: str = "--out") -> Path:
    """A folder or file given on the command line; an empty one (an unset shell variable) would
    mean the current folder, which is never what was meant."""
    if not str(out).strip():
        raise RunDirError(f"{option}: expected a path, got an empty string (an unset variable?)")
    return Path(out)


def check_new_run(out: str | Path) -> Path:
    """The folder for a new run: missing or empty (a lock file of vaelab's aside), never a
    folder holding anything of the user's, nor a run (that is resumed, not restarted)."""
    run = folder_arg(out)
    if run.exists() and not run.is_dir():
        raise RunDirError(f"'{run}' exists and is not a folder")
    if not run.is_dir():
        return run
    if (run / CONFIG).exists():
        raise RunDirError(f"'{run}' already holds a run: continue it with `--resume {run}`")
    entries = sorted(e.name for e in run.iterdir() if not is_lock_file(e))
    if entries:
        more = f" and {len(entries) - 3} more" if len(entries) > 3 else ""
        shown = ", ".join(entries[:3]) + more
        raise RunDirError(
            f"'{run}' is not empty (it holds {shown}): a new run needs an empty or missing "
            "folder; choose another --out"
        )
    return run


def run_containing(path: str | Path) -> tuple[Path, Path] | None:
    """(run, path relative to it) if ``path`` lies inside a vaelab run directory."""
    path = Path(path).resolve()
    for parent in path.parents:
        if is_run(parent):
            return parent, path.relative_to(parent)
    return None


def written_by_vaelab(path: str | Path) -> bool:
    """Whether an existing file carries the mark vaelab puts in its PNG and HTML outputs."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return PNG_MARK in head
    return HTML_MARK.encode() in head


def check_output(out: str | Path, *, overwrite: bool = False) -> Path:
    """An output file of a command (a PNG, an .npy, an HTML page): never a folder, never one of
    a run's own files, and never an existing file that vaelab did not write, unless
    ``overwrite``. Checked before any work is done."""
    path = folder_arg(out)
    if path.is_dir():
        raise RunDirError(f"--out '{path}' is a folder: expected a file name, e.g. {path}/out.png")
    if path.name == LOCK or (path.name in COLLECTION_FILES and is_lock_file(path.parent / LOCK)):
        raise RunDirError(
            f"--out '{path}' would write over a file vaelab keeps in '{path.parent}': choose "
            "another file"
        )
    inside = run_containing(path)
    if inside is not None and inside[1].parts and inside[1].parts[0] in RESERVED:
        run, rel = inside
        raise RunDirError(
            f"--out '{path}' would write over the run's own '{rel.as_posix()}' in '{run}': "
            f"choose another file (e.g. {run / FIGURES / path.name})"
        )
    if path.exists() and not overwrite and not written_by_vaelab(path):
        raise RunDirError(
            f"--out '{path}' exists and carries no mark of vaelab's (its PNG and HTML files do): "
            "choose another file, or pass --overwrite to replace it"
        )
    check_writable(path.parent)
    return path
