"""Hand resized images from the worker processes to the parent through tmpfs files instead of the result pipe.

Pickling a 512x512 image through ``concurrent.futures`` costs about as much CPU as decoding it (four copies and fresh
buffers on both sides). Instead a worker writes the pixels to ``/dev/shm/solo_pp_<parent>_<worker>_<n>`` and sends
only ``(path, shape)``; the parent maps the file read-only, unlinks it at once and gives the mapped array to the
packer (which copies it into its own buffer). Files of a build whose parent died (``kill -9``) are removed by the
next build (``remove_stale``).
"""

from __future__ import annotations

import itertools
import mmap
import os
from pathlib import Path

import numpy as np

PREFIX = "solo_pp_"
MIN_BYTES = 1 << 17  # smaller images (a 128x128 one is 48 KB) are cheaper to pickle than a file create + map
_counter = itertools.count()


def default_dir() -> str:
    """/dev/shm when it is a writable directory (Linux), else "" (handoff off: results go through the pipe)."""
    d = "/dev/shm"
    return d if os.path.isdir(d) and os.access(d, os.W_OK) else ""


def export(img: np.ndarray, directory: str, parent_pid: int) -> tuple[str, str, tuple[int, ...]]:
    """Worker side: write ``img`` to a new tmpfs file; returns the token that replaces it in the result."""
    path = os.path.join(directory, f"{PREFIX}{parent_pid}_{os.getpid()}_{next(_counter)}")
    data = memoryview(np.ascontiguousarray(img)).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return ("handoff", path, tuple(img.shape))


def is_token(item: object) -> bool:
    return isinstance(item, tuple) and len(item) == 3 and item[0] == "handoff"


def load(token: tuple[str, str, tuple[int, ...]]) -> np.ndarray:
    """Parent side: a read-only uint8 view of the file (mapped; the file is unlinked immediately)."""
    _, path, shape = token
    fd = os.open(path, os.O_RDONLY)
    try:
        size = int(np.prod(shape))
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        os.unlink(path)
    return np.frombuffer(mm, dtype=np.uint8).reshape(shape)


def discard(items: list) -> None:
    """Parent side: unlink the files of a result that is not used."""
    for it in items:
        if is_token(it):
            Path(it[1]).unlink(missing_ok=True)


def remove_own(directory: str, parent_pid: int) -> None:
    """Remove the handoff files of this build that were never loaded (a build that stopped on an error)."""
    if directory:
        for p in Path(directory).glob(f"{PREFIX}{parent_pid}_*"):
            p.unlink(missing_ok=True)


def remove_stale(directory: str) -> int:
    """Remove handoff files whose build process no longer exists; returns how many."""
    if not directory:
        return 0
    n = 0
    for p in Path(directory).glob(f"{PREFIX}*"):
        try:
            pid = int(p.name[len(PREFIX) :].split("_", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            n += 1
        except (ValueError, PermissionError):
            continue
    return n
