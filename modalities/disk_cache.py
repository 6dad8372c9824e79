"""Values computed from data files once and kept on disk: decoded images, audio features.

An entry is keyed by what it was computed from (file names, sizes and modification times, and the
parameters of the computation), written atomically with its size and SHA-256 beside it
(:func:`mmkd.io.save_checked`), and rebuilt with a warning when damaged; it lives in a cache folder
(default ``~/.cache/mmkd``), never in the read-only data root.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from torch import Tensor

from mmkd import io

log = logging.getLogger("mmkd")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mmkd`` (``~/.cache/mmkd`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmkd"


def file_stats(folder: Path, files: list[str]) -> list[list]:
    """``[name, size, modification time in ns]`` of every file: what a cache of them is keyed by."""
    return [[f, (st := os.stat(folder / f)).st_size, st.st_mtime_ns] for f in files]


def cached(kind: str, params: dict, files: list[list], compute: Callable[[], Tensor], cache_dir: Path,
           owner: str) -> Tensor:
    """``compute()``, cached on disk in ``cache_dir/<owner>-<kind>-<key>.pt`` where the key hashes
    ``kind``, ``params`` and ``files`` (see :func:`file_stats`); written atomically with its size and
    SHA-256 beside it (``mmkd.io.save_checked``), so a file there is always complete, and one that is
    damaged (by something else), has no index or cannot be read is rebuilt with a warning. A build
    logs how long it took."""
    key = hashlib.sha256(json.dumps([kind, params, files]).encode()).hexdigest()[:24]
    path = cache_dir / f"{owner}-{kind}-{key}.pt"
    stored = io.load_checked(path, log)  # None on a miss, and (with a warning) on a damaged entry
    if stored is not None:
        if (isinstance(stored, dict) and stored.get("params") == params and stored.get("files") == files
                and isinstance(stored.get("data"), Tensor)):
            return stored["data"]
        log.warning("%s: cache file holds other data than its name says; rebuilding it", path)
    start = time.perf_counter()
    data = compute()
    log.info("%s: built the %s cache of %d files in %.1f s: %s", owner, kind, len(files),
             time.perf_counter() - start, path)
    io.save_checked({"params": params, "files": files, "data": data}, path)
    return data
