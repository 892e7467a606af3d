"""``folder``: every image under data.root, recursively, centre-cropped and resized.

The train/val split hashes each file's path relative to the root, so adding files never moves
old ones from one split to the other.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np

from vaelab.config import DataConfig
from vaelab.data import cache
from vaelab.data.base import DataError, ImageDataset, Splits, log
from vaelab.data.images import EXTENSIONS

DEFAULT_SIZE = 64


def require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"data.name={cfg.name} needs data.root=PATH (the folder of its files)")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is not a folder")
    return root


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _resolves_inside(path: str, real_root: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(real_root)
    except (OSError, ValueError):
        return False


def image_files(folder: Path, recursive: bool = True) -> list[str]:
    """Sorted paths (relative to ``folder``, '/'-separated) of files with an image extension.

    Symlinked folders are followed, each real folder once: a link to a folder inside ``folder``
    (a loop, or a second name) is not followed, as that folder is listed under its own name,
    and a folder outside linked twice is listed under the first link in name order. Only
    regular files are listed: a dangling link, a FIFO (opening it would block), a socket or a
    device with an image extension is never opened; one warning line counts them (and folders
    that cannot be listed) and names the first few.
    """
    found: list[str] = []
    skipped: list[str] = []  # "name (why)"
    repeated: list[str] = []
    seen: set[tuple[int, int]] = set()
    try:
        st = folder.stat()
        seen.add((st.st_dev, st.st_ino))
        real_root = folder.resolve(strict=True)
    except OSError as err:
        raise DataError(f"'{folder}': cannot read ({err.strerror or err})") from None
    pending = [(folder, "")]
    while pending:
        where, prefix = pending.pop()
        try:
            with os.scandir(where) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            if where == folder:
                raise DataError(f"'{folder}': cannot list ({err.strerror or err})") from None
            skipped.append(f"{prefix} (a folder that cannot be listed: {err.strerror or err})")
            continue
        subfolders = []
        for entry in entries:
            rel = prefix + entry.name
            image = Path(entry.name).suffix.lower() in EXTENSIONS and not entry.name.startswith(".")
            try:
                if entry.is_file(follow_symlinks=False):  # the common case: no stat call
                    if image:
                        found.append(rel)
                    continue
                if not (image or recursive):
                    continue
                st = entry.stat()  # follows symlinks
            except OSError as err:
                if image:
                    dangling = isinstance(err, FileNotFoundError) and entry.is_symlink()
                    skipped.append(f"{rel} ({'a dangling link' if dangling else err.strerror})")
                continue
            if stat.S_ISDIR(st.st_mode):
                if not recursive:
                    continue
                inside = entry.is_symlink() and _resolves_inside(entry.path, real_root)
                if inside or (st.st_dev, st.st_ino) in seen:
                    repeated.append(rel)
                    continue
                seen.add((st.st_dev, st.st_ino))
                subfolders.append((Path(entry.path), rel + "/"))
            elif image:
                if stat.S_ISREG(st.st_mode):
                    found.append(rel)
                else:
                    skipped.append(f"{rel} ({_kind(st.st_mode)})")
        pending.extend(reversed(subfolders))  # depth first, in name order: deterministic
    if repeated:
        log.info(
            f"'{folder}': not following {len(repeated)} linked folders listed already "
            f"(a link loop or a folder linked twice): {', '.join(sorted(repeated)[:3])}"
            + (f" and {len(repeated) - 3} more" if len(repeated) > 3 else "")
        )
    if skipped:
        skipped.sort()
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        log.warning(
            f"'{folder}': skipped {len(skipped)} entries with an image extension that are not "
            f"regular files, or that cannot be read: {', '.join(skipped[:3])}{more}"
        )
    return sorted(found)


def hash_fraction(name: str) -> float:
    """A stable number in [0, 1) from a relative path (the first 8 bytes of its SHA-1).

    A name that is not UTF-8 on disk (Python keeps its bytes as surrogates) hashes its bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha1(raw).digest()[:8], "big") / 2**64


def hash_split(names: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) by hashing names; at least one image in each when n >= 2."""
    fractions = np.array([hash_fraction(n) for n in names])
    is_val = fractions < val_fraction
    if not is_val.any() and len(names) >= 2:
        is_val[np.argmin(fractions)] = True
    if is_val.all() and len(names) >= 2:
        is_val[np.argmax(fractions)] = False
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def build(cfg: DataConfig, progress: bool = True) -> Splits:
    root = require_root(cfg)
    files = image_files(root)
    if not files:
        raise DataError(
            f"data.root '{root}': no image files ({', '.join(EXTENSIONS)}) in it or below it"
        )
    size, channels = cfg.size or DEFAULT_SIZE, cfg.channels or 3
    images, manifest = cache.prepare("folder", root, files, cfg, size, cfg.crop, channels, progress)
    train_idx, val_idx = hash_split(manifest["images"], cfg.val_fraction)
    log.info(f"folder {root}: {len(train_idx)} train, {len(val_idx)} val images")
    full = ImageDataset(images)
    return Splits(full.subset(train_idx), full.subset(val_idx), info=manifest)
