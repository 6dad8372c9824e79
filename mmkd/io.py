"""Atomic file writes: a file is either absent, or complete; never half-written."""
from __future__ import annotations

import errno
import glob
import io as _io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

_UMASK = os.umask(0)  # read the process umask once (there is no getter) ...
os.umask(_UMASK)  # ... and put it back


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit


class NoSpace(OSError):
    """A write failed for lack of space; the message names the folder. The file it was replacing
    (a previous checkpoint, say) is left as it was."""

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    A write that fails for lack of space raises :class:`NoSpace` naming the folder.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        _raise_full(e, path)
        raise
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions of a new file
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _raise_full(e, path)
        raise
    finally:
        for left in glob.glob(glob.escape(tmp) + "*"):  # the file, and any sidecar it grew (ONNX .data)
            os.unlink(left)


def _raise_full(e: OSError, path: Path) -> None:
    if e.errno in FULL and not isinstance(e, NoSpace):
        raise NoSpace(e.errno, f"no space left on {path.parent} (writing {path.name}: {e.strerror}); "
                      "free some space or set out_dir / cache_dir to another disk") from None


def check_writable(path: str | os.PathLike, key: str, file: bool = False) -> Path:
    """``path`` if it can be written (a folder to be, or with ``file`` a file to be), else a one-line
    :class:`mmkd.config.ConfigError` naming ``key``: a file where a folder is wanted (or the reverse),
    a path under a file, or a folder where no file can be created. That last is tried with a temporary
    file in the nearest existing folder, deleted at once (permission bits do not tell, e.g. for root);
    nothing is created that stays."""
    from mmkd.config import ConfigError

    path = Path(path)
    if path.exists() and path.is_dir() == file:
        raise ConfigError(f"{key}: {str(path)!r} is a {'directory' if file else 'file'}; give a "
                          f"{'file path' if file else 'directory'}")
    folder = path.parent if file else path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{key}: cannot write {str(path)!r}: {str(folder)!r} is a file, not a folder; "
                          "give a path in a writable folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".mmkd-write-check.", suffix=".tmp")
    except OSError as e:
        raise ConfigError(f"{key}: cannot write {str(path)!r} into {str(folder)!r} "
                          f"({e.strerror or type(e).__name__}); give a path in a writable folder") from None
    os.close(fd)
    os.unlink(tmp)
    return path


def save(obj: Any, path: str | os.PathLike) -> bytes:
    """``torch.save`` ``obj`` to ``path`` atomically; returns the bytes written. They are serialised
    in memory first, so a full disk surfaces as :class:`NoSpace` (torch's own writer reports only
    ``file write failed``)."""
    buf = _io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())
    return buf.getvalue()


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(json.dumps(obj, indent=2) + "\n", path)


# ---------------------------------------------------------------- safe reading, and checked caches
def first_line(e: BaseException, typed: bool = True) -> str:
    """The first line of an exception's message (at most 160 characters), after its type's name
    (``typed``), for one-line errors; the type's name alone when the message is empty."""
    text = str(e).strip().splitlines()[0].strip() if str(e).strip() else ""
    if len(text) > 160:
        text = text[:157] + "..."
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if typed else text


def load(path: str | os.PathLike, what: str, fix: str = "replace it with a file written by torch.save",
         map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never arbitrary
    pickled objects (unpickling those can run code).

    Any failure (not a checkpoint, truncated, empty, holding objects a weights-only load refuses)
    is a one-line :class:`mmkd.data.DataError` ``"<path>: cannot read <what> (<reason>); <fix>"``.
    """
    import pickle

    from mmkd.data import DataError

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file ({what}); {fix}") from None
    except pickle.UnpicklingError as e:
        reason = ("it holds pickled objects other than tensors and plain containers, which a "
                  "weights-only load refuses because unpickling them can run code"
                  if "weights only" in str(e).lower() else first_line(e))
        raise DataError(f"{path}: cannot read {what} ({reason}); {fix}") from None
    except (MemoryError, RecursionError):
        raise
    except Exception as e:  # RuntimeError (damaged zip), EOFError (empty), KeyError (text), OSError, ...
        detail = "" if isinstance(e, KeyError) else f" ({first_line(e)})"  # KeyError: an opcode of a non-pickle
        raise DataError(f"{path}: cannot read {what}, it is not a complete torch.save file{detail}; {fix}") from None


def index_path(path: str | os.PathLike) -> Path:
    """The checksum index of a :func:`save_checked` file: ``<name>.json`` beside ``<name>.pt``."""
    return Path(path).with_suffix(".json")


def _digest(data: bytes) -> tuple[int, str]:
    """Size in bytes and SHA-256 of ``data``."""
    import hashlib

    return len(data), hashlib.sha256(data).hexdigest()


def save_checked(obj: Any, path: str | os.PathLike) -> None:
    """:func:`save` ``obj`` to ``path``, then write the size and SHA-256 of its bytes to
    :func:`index_path`; both writes are atomic. Writers of one entry store the same bytes (the same
    outputs serialise alike), so concurrent writers leave a file that matches its index; any mismatch
    only costs a rebuild (:func:`load_checked`)."""
    path = Path(path)
    size, sha = _digest(save(obj, path))
    write_json({"file": path.name, "size": size, "sha256": sha}, index_path(path))


def load_checked(path: str | os.PathLike, log: Any = None) -> Any | None:
    """The object stored by :func:`save_checked` at ``path``, or ``None`` if it must be rebuilt.

    ``None`` silently when ``path`` does not exist; with a warning naming the file when it has no
    index (never loaded blindly), when its size or SHA-256 differs from the index (truncated or
    damaged) or when it cannot be read (see :func:`load`).
    """
    import logging

    from mmkd.data import DataError

    log = log or logging.getLogger("mmkd")
    path = Path(path)
    if not path.exists():
        return None
    index = index_path(path)
    try:
        meta = json.loads(index.read_text())
        want = int(meta["size"]), str(meta["sha256"])
    except FileNotFoundError:
        log.warning("%s: cache file without its index %s; not loading it, rebuilding it", path, index.name)
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable cache index %s (%s); rebuilding the entry", path, index.name, first_line(e))
        return None
    got = _digest(path.read_bytes())
    if got != want:
        log.warning("%s: damaged cache file (%d bytes, SHA-256 %s..., but its index %s says %d bytes, %s...); "
                    "rebuilding it", path, got[0], got[1][:12], index.name, want[0], want[1][:12])
        return None
    try:
        return load(path, "the cache entry", fix="rebuilding it")
    except DataError as e:
        log.warning("%s", e)
        return None
