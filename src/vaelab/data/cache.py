"""The preprocessing cache: decode, crop and resize once; train from a memory-mapped array.

For a source (a folder of image files and the preprocessing parameters) the cache is two files in
the cache folder: ``<source>-<key>.npy``, uint8 (N, size, size, C), and ``<source>-<key>.json``,
the manifest: format version, parameters, every source file with its size and mtime, the images
in array order, and the files skipped as unreadable. The key hashes the folder and parameters,
so different sizes live side by side; the manifest's file list decides whether the array is
still valid (a touched, added or removed file rebuilds it).

Writing order makes an interrupted build harmless: the old manifest is removed first, the array
is written to a temporary file and renamed, the manifest is written last. An array without a
manifest is never trusted.

Nothing in the cache folder is trusted: a manifest that is not UTF-8, not JSON, not an object,
with fields of the wrong type or a list of images that does not match the source files, and an
array that cannot be memory-mapped (never unpickled), has another dtype or shape, or a file
length that is not its header's, are each logged with the reason and rebuilt. Checking and
building hold a lock on the cache file (``.<name>.npy.lock``): a second process preparing the
same images waits, then reuses what the first one built.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from vaelab import progress as progress_bars
from vaelab.config import DataConfig
from vaelab.data.base import DataError, check_memory, format_bytes, log
from vaelab.data.images import decode_job
from vaelab.rundir import Lock, RunDirError, atomic_write, check_writable, lock

# 2: EXIF orientation applied, 16-bit grey PNGs scaled to 8 bits (not clipped): decoding changed
FORMAT_VERSION = 2
SERIAL_BELOW = 64  # fewer files than this are decoded in-process: a pool costs more than it saves


def default_cache_dir() -> Path:
    if os.environ.get("VAELAB_CACHE"):
        return Path(os.environ["VAELAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vaelab"


def listing(folder: Path, files: list[str]) -> list[list[Any]]:
    """[[relative name, size in bytes, mtime in ns], ...] for files under ``folder``."""
    out = []
    for rel in files:
        try:
            st = (folder / rel).stat()
        except OSError as err:
            raise DataError(f"'{folder / rel}': cannot read ({err.strerror or err})") from None
        out.append([rel, st.st_size, st.st_mtime_ns])
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (so True is not 1, nor 1.0 an integer)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_manifest(
    path: Path, params: dict[str, int], sources: list[list[Any]]
) -> dict[str, Any] | str:
    """The manifest at ``path`` if it is well formed and describes ``sources`` prepared with
    ``params``; else the reason it is not trusted."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        return f"its manifest cannot be read ({err.strerror or err})"
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "its manifest is not UTF-8 text"
    except (ValueError, RecursionError):
        return "its manifest is not valid JSON"
    if not isinstance(manifest, dict):
        return "its manifest is not a JSON object"
    if not _same(manifest.get("version"), FORMAT_VERSION):
        return "the cache format changed"
    if not _same(manifest.get("params"), params):
        return "the preprocessing parameters changed"
    if not _same(manifest.get("sources"), sources):
        return "source files changed"
    count, names, skipped = manifest.get("count"), manifest.get("images"), manifest.get("skipped")
    if type(count) is not int or count < 1:
        return "its manifest's count is not a positive integer"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "its manifest's images are not a list of file names"
    if not isinstance(skipped, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("reason"), str)
        for s in skipped
    ):
        return "its manifest's skipped files are not a list of {file, reason}"
    if len(names) != count:
        return f"its manifest lists {len(names)} images but counts {count}"
    left_out = {s["file"] for s in skipped}
    kept = [rel for rel, _, _ in sources if rel not in left_out]
    if names != kept or len(names) + len(skipped) != len(sources):
        return "its manifest's images and skipped files are not the source files"
    return manifest


def check_array(npy: Path, shape: tuple[int, ...]) -> np.ndarray | str:
    """The memory-mapped uint8 array ``npy`` if it has ``shape`` and exactly the bytes its
    header declares; else the reason it is not trusted. Never unpickles anything."""
    try:
        images = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError, SyntaxError, TypeError) as err:
        why = (str(err).splitlines() or [type(err).__name__])[0][:120]
        return f"the cached array cannot be read ({why})"
    if not isinstance(images, np.ndarray):  # an .npz archive under the .npy name
        getattr(images, "close", lambda: None)()
        return "the cached array is not an .npy array"
    if images.dtype != np.uint8 or images.shape != shape:
        return f"the cached array is {images.dtype} {images.shape}, not uint8 {shape}"
    if not images.flags.c_contiguous:
        return "the cached array is not in C order"
    try:
        length = npy.stat().st_size
    except OSError as err:
        return f"the cached array cannot be read ({err.strerror or err})"
    offset = getattr(images, "offset", None)
    if offset is None or length != offset + images.nbytes:
        return f"the cached array's file holds {length:,} bytes, not its header's"
    return images


def _shrink_npy(path: Path, rows: int) -> None:
    """Rewrite an .npy header in place to ``rows`` leading rows and cut the file after them.

    Used when some files were skipped: the array was allocated for every file, filled from the
    front, and its tail is unused. The new header is padded to the old length, so the data
    offset does not move (the row count has no more digits than before).
    """
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    shape, offset, row_bytes = arr.shape, arr.offset, arr[0].nbytes if len(arr) else 0
    del arr
    with open(path, "r+b") as f:
        major, _ = np.lib.format.read_magic(f)
        start = f.tell()
        header = repr({"descr": "|u1", "fortran_order": False, "shape": (rows, *shape[1:])})
        length = offset - start - (2 if major == 1 else 4)
        f.seek(start + (2 if major == 1 else 4))
        f.write((header.ljust(length - 1) + "\n").encode("latin1"))
        f.truncate(offset + rows * row_bytes)


def prepare(
    source: str,
    folder: Path,
    files: list[str],
    cfg: DataConfig,
    size: int,
    crop: int,
    channels: int,
    progress: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The memory-mapped images of ``files`` under ``folder`` (built or reused), and manifest."""
    params = {"size": size, "crop": crop, "channels": channels}
    root = str(folder.resolve())
    key = hashlib.sha256(json.dumps([source, root, params, FORMAT_VERSION]).encode()).hexdigest()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    npy = cache / f"{source}-{size}px-{key[:16]}.npy"
    manifest_path = npy.with_suffix(".json")
    sources = listing(folder, files)

    try:
        held = _lock(cache, npy)
    except RunDirError as err:
        # A folder this user cannot write: a cache prepared there by someone else is still
        # used, once checked; anything else is refused (nothing can be written there).
        found = _reuse(npy, manifest_path, params, sources)
        if isinstance(found, tuple):
            log.info(f"using the read-only cache {npy} ({len(found[0])} images)")
            return found[0], {**found[1], "cache": str(npy), "reused": True}
        raise DataError(
            f"{err} (the preprocessing cache; set data.cache_dir=PATH or $VAELAB_CACHE)"
        ) from None
    with held:  # checking and building: one process at a time
        found = _reuse(npy, manifest_path, params, sources)
        if isinstance(found, tuple):
            images, manifest = found
            log.info(f"using the cache {npy} ({len(images)} images)")
            return images, {**manifest, "cache": str(npy), "reused": True}
        log.info(f"preparing {len(files)} images from {folder} into {npy} ({found})")
        return _build(folder, sources, npy, manifest_path, params, cfg.workers, progress)


def _lock(cache: Path, npy: Path) -> Lock:
    """Hold the lock of the cache file ``npy``, waiting (and saying so) while another process
    holds it; removing its stale temporaries is safe only under it."""
    check_writable(cache)
    name = f".{npy.name}.lock"
    try:
        return lock(cache, name=name, what="preparing these images")
    except RunDirError:
        if not os.access(cache, os.W_OK | os.X_OK):
            raise
        log.info(f"waiting for another process preparing the same images into {npy}")
        return lock(cache, name=name, wait=True)


def _reuse(
    npy: Path, manifest_path: Path, params: dict[str, int], sources: list[list[Any]]
) -> tuple[np.ndarray, dict[str, Any]] | str:
    """(images, manifest) of a valid cache, or why there is none to use."""
    has_manifest, has_array = manifest_path.is_file(), npy.is_file()
    if not has_manifest:
        return (
            "an array without its manifest (an interrupted build)" if has_array else "no cache yet"
        )
    if not has_array:
        return "its manifest has no array"
    manifest = check_manifest(manifest_path, params, sources)
    if isinstance(manifest, str):
        return manifest
    shape = (manifest["count"], params["size"], params["size"], params["channels"])
    images = check_array(npy, shape)
    if isinstance(images, str):
        return images
    return images, manifest


def _build(
    folder: Path,
    sources: list[list[Any]],
    npy: Path,
    manifest_path: Path,
    params: dict[str, int],
    workers: int,
    progress: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    size, crop, channels = params["size"], params["crop"], params["channels"]
    jobs = [(str(folder / rel), size, crop, channels) for rel, _, _ in sources]
    check_disk(npy.parent, len(jobs), size, channels)
    parallel = min(workers or os.cpu_count() or 1, len(jobs))
    # Each decoding process holds an image at data.size and its resized copy.
    check_memory(2 * size * size * channels * max(parallel, 1), size, "decoding the images")
    try:
        manifest_path.unlink(missing_ok=True)  # from here on, nothing here is trusted
        for stale in npy.parent.glob(f".{npy.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by an interrupted build (the lock is ours)
    except OSError as err:
        raise DataError(f"cannot write the cache '{npy}': {err.strerror or err}") from None
    tmp = npy.parent / f".{npy.name}.{os.getpid()}.tmp"
    start = time.perf_counter()
    names: list[str] = []
    skipped: list[dict[str, str]] = []
    try:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(max(len(jobs), 1), size, size, channels)
        )
        bar = progress_bars.bar(len(jobs), "preparing", enabled=progress, unit="img")
        for (rel, _, _), (img, why) in zip(sources, _decode_all(jobs, workers), strict=True):
            if img is None:
                skipped.append({"file": rel, "reason": why or "unreadable"})
            else:
                out[len(names)] = img
                names.append(rel)
            bar.update(1)
        bar.close()
        out.flush()
        del out
        if not names:
            raise DataError(
                f"'{folder}': none of its {len(jobs)} image files could be read "
                f"(first: {skipped[0]['file']}: {skipped[0]['reason']})"
            )
        if len(names) < len(jobs):
            _shrink_npy(tmp, len(names))
        os.replace(tmp, npy)
    except OSError as err:
        raise DataError(f"cannot write the cache '{npy}': {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    manifest = {
        "version": FORMAT_VERSION,
        "params": params,
        "folder": str(folder.resolve()),
        "count": len(names),
        "images": names,
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(jobs) / seconds, 1) if seconds > 0 else None,
        "sources": sources,
    }
    if skipped:
        shown = ", ".join(f"{s['file']} ({s['reason']})" for s in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        log.warning(
            f"skipped {len(skipped)} of {len(jobs)} files that are not readable images: "
            f"{shown}{more}; all are listed in {manifest_path}"
        )
    atomic_write(manifest_path, json.dumps(manifest) + "\n")
    return np.load(npy, mmap_mode="r", allow_pickle=False), {
        **manifest,
        "cache": str(npy),
        "reused": False,
    }


def check_disk(folder: Path, n: int, size: int, channels: int) -> None:
    """Refuse, before writing anything, a cache that the disk under ``folder`` cannot hold (a
    memory-mapped file on a full disk kills the process, with no message)."""
    need = n * size * size * channels + 4096  # the images and the .npy header
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > free:
        raise DataError(
            f"data.size={size}: caching {n:,} images of {size}x{size}x{channels} would need "
            f"{format_bytes(need)} in '{folder}', but only {format_bytes(free)} are free there; "
            "choose a smaller data.size or another data.cache_dir"
        )


def _decode_all(jobs: list[tuple[str, int, int, int]], workers: int):  # noqa: ANN202 (generator)
    """Decoded images in job order, on ``workers`` processes (0: all cores)."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < SERIAL_BELOW:
        yield from map(decode_job, jobs)
        return
    # fork starts workers in milliseconds; they only run Pillow, never torch.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        yield from pool.imap(decode_job, jobs, chunksize=32)
