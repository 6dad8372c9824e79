"""A run directory has one writer at a time.

:func:`claim` takes an exclusive OS lock (``fcntl.flock``) on ``<run_dir>/.lock`` for the whole run;
the kernel releases it on any exit, ``kill -9`` included. A second ``mmkd run`` on the same
directory stops at once with a one-line error naming the holder's pid. On resume, the holder
first removes the temporary files that an interrupted atomic write (:mod:`mmkd.io`) left behind.
"""
from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mmkd.config import ConfigError

log = logging.getLogger("mmkd")

LOCK = ".lock"


class RunDirBusy(ConfigError):
    """Another process holds the run directory."""


def temporaries(run_dir: Path) -> list[Path]:
    """Files that an interrupted atomic write left in ``run_dir`` (``.<stem>.<random>.tmp<suffix>``)."""
    return sorted(p for p in run_dir.rglob(".*.tmp*") if p.is_file() and ".tmp" in p.name)


@contextmanager
def claim(run_dir: str | os.PathLike, resume: bool = False) -> Iterator[Path]:
    """Hold ``run_dir`` exclusively for the block; raise :class:`RunDirBusy` if another process does.

    With ``resume``, the temporary files of interrupted writes are removed first. If the block fails
    before it wrote anything, the directories this call created are removed again, so a refused
    config leaves nothing behind.
    """
    run_dir = Path(run_dir)
    created = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    while True:  # the lock file may be removed (below) between our open and our flock: retry then
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"run_dir={str(run_dir)!r} is in use by another mmkd run (pid {holder}); "
                             "wait for it to finish or give another run_dir") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        if resume:
            for tmp in temporaries(run_dir):
                log.info("removing %s (left by an interrupted write)", tmp)
                tmp.unlink()
        yield run_dir
    except BaseException:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            lock.unlink()
            for d in created:
                if not any(d.iterdir()):
                    d.rmdir()
        raise
    finally:
        os.close(fd)
