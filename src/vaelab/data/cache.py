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
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vaelab.checkpoint import atomic_write
from vaelab.config import DataConfig
from vaelab.data.base import DataError, log
from vaelab.data.images import decode_job

FORMAT_VERSION = 1
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
        st = (folder / rel).stat()
        out.append([rel, st.st_size, st.st_mtime_ns])
    return out


def _shrink_npy(path: Path, rows: int) -> None:
    """Rewrite an .npy header in place to ``rows`` leading rows and cut the file after them.

    Used when some files were skipped: the array was allocated for every file, filled from the
    front, and its tail is unused. The new header is padded to the old length, so the data
    offset does not move (the row count has no more digits than before).
    """
    arr = np.load(path, mmap_mode="r")
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

    reason = "no cache yet"
    if manifest_path.is_file() and npy.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if manifest.get("version") != FORMAT_VERSION or manifest.get("params") != params:
            reason = "the cache format or parameters changed"
        elif manifest.get("sources") != sources:
            reason = "source files changed"
        else:
            images = np.load(npy, mmap_mode="r")
            if images.shape == (manifest["count"], size, size, channels):
                log.info(f"using the cache {npy} ({len(images)} images)")
                return images, {**manifest, "cache": str(npy), "reused": True}
            reason = "the cached array does not match its manifest"
    log.info(f"preparing {len(files)} images from {folder} into {npy} ({reason})")
    return _build(folder, sources, npy, manifest_path, params, cfg.workers, progress)


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
    npy.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # from here on, nothing here is trusted
    for stale in npy.parent.glob(f".{npy.name}.*.tmp"):
        stale.unlink(missing_ok=True)  # left by an interrupted build
    tmp = npy.parent / f".{npy.name}.{os.getpid()}.tmp"
    jobs = [(str(folder / rel), size, crop, channels) for rel, _, _ in sources]
    start = time.perf_counter()
    names: list[str] = []
    skipped: list[dict[str, str]] = []
    try:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(max(len(jobs), 1), size, size, channels)
        )
        bar = tqdm(total=len(jobs), unit="img", desc="preparing", disable=not progress)
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
    return np.load(npy, mmap_mode="r"), {**manifest, "cache": str(npy), "reused": False}


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
