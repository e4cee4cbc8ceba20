"""Hand resized images from the worker processes to the parent through tmpfs files instead of the result pipe.

Pickling a 512x512 image through ``concurrent.futures`` costs about as much CPU as decoding it (four copies and fresh
buffers on both sides). Instead a worker copies the pixels into shared memory and sends only ``(kind, path, shape)``.

``export_slot`` (what the build uses): each worker keeps a set of reusable tmpfs files ("slots",
``/dev/shm/solo_pp_<parent>_<worker>_s<k>_<random>``), mapped by both sides. Byte 0 of a slot is its busy flag: the
worker sets it and copies the pixels in; the parent maps the slot once (cached) and gives the view and the slot's busy
byte to the packer (``busy_flags``), whose intake thread copies the patches into its own buffer and then clears the
flag itself, so the parent's Python thread neither waits for the copy nor takes part in the release (``release`` does
it from Python, for callers that copy synchronously). Reusing mapped pages saves the page allocation,
zeroing and faults a fresh file costs on both sides. When a worker's slots are all busy and hold
``MAX_SLOT_BYTES``, it falls back to ``export``: a one-shot file that the parent maps and unlinks at once.

Files of a build whose parent died (``kill -9``) are removed by the next build (``remove_stale``); a build removes its
own at the end (``remove_own``).
"""

from __future__ import annotations

import itertools
import mmap
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_solo.format.layout import patch_grid

PREFIX = "solo_pp_"
MIN_BYTES = 1 << 17  # smaller images (a 128x128 one is 48 KB) are cheaper to pickle than a file create + map
SLOT_HEADER = 64  # byte 0: busy flag; pixels start at this offset (cache-line aligned)
SLOT_GRAIN = 1 << 20  # slot sizes are rounded up to this
MAX_SLOT_BYTES = 256 << 20  # per worker; beyond it (all busy) images go through one-shot files
_counter = itertools.count()


@dataclass
class _Slot:
    path: str
    mm: mmap.mmap
    capacity: int


_slots: list[_Slot] = []  # worker side: this process's slots
_slot_bytes = 0
_maps: dict[str, mmap.mmap] = {}  # parent side: slot path -> shared mapping
_flags: dict[str, np.ndarray] = {}  # parent side: slot path -> uint8[1] view of its busy byte


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


def _new_slot(nbytes: int, directory: str, parent_pid: int) -> _Slot | None:
    global _slot_bytes
    capacity = -(-nbytes // SLOT_GRAIN) * SLOT_GRAIN
    if _slot_bytes + capacity > MAX_SLOT_BYTES:
        return None
    name = f"{PREFIX}{parent_pid}_{os.getpid()}_s{len(_slots)}_{secrets.token_hex(4)}"  # never a reused name
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, SLOT_HEADER + capacity)
        mm = mmap.mmap(fd, SLOT_HEADER + capacity)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    _slot_bytes += capacity
    slot = _Slot(path, mm, capacity)
    _slots.append(slot)
    return slot


def export_slot(img: np.ndarray, directory: str, parent_pid: int) -> tuple[str, str, tuple[int, ...]]:
    """Worker side: an RGB image into a free reusable slot (or, none free, a one-shot file) as its patch grid
    (``layout.patch_grid``: patchified here, with the pixels in this core's cache, so the parent copies the patches
    sequentially instead of gathering them); returns the token that replaces it in the result."""
    n = img.nbytes
    slot = next((s for s in _slots if s.capacity >= n and s.mm[0] == 0), None)
    if slot is None:
        slot = _new_slot(n, directory, parent_pid)
        if slot is None:
            return export(patch_grid(img), directory, parent_pid)
    slot.mm[0] = 1
    grid = patch_grid(img, out=np.frombuffer(slot.mm, np.uint8, n, SLOT_HEADER))
    return ("slot", slot.path, grid.shape)


def is_token(item: object) -> bool:
    return isinstance(item, tuple) and len(item) == 3 and item[0] in ("handoff", "slot")


def load(token: tuple[str, str, tuple[int, ...]]) -> np.ndarray:
    """Parent side: a uint8 view of the pixels. One-shot files are mapped read-only and unlinked immediately; slots
    stay mapped (cached) and must be handed back with ``release`` once the pixels are consumed."""
    kind, path, shape = token
    size = int(np.prod(shape))
    if kind == "slot":
        mm = _maps.get(path)
        if mm is None:
            fd = os.open(path, os.O_RDWR)
            try:
                mm = _maps[path] = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
        return np.frombuffer(mm, np.uint8, size, SLOT_HEADER).reshape(shape)
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
        os.unlink(path)
    return np.frombuffer(mm, dtype=np.uint8).reshape(shape)


def release(items: list) -> None:
    """Parent side, after the pixels were copied out: hand the result's slots back to their workers."""
    for it in items:
        if is_token(it) and it[0] == "slot":
            _maps[it[1]][0] = 0


def busy_flags(items: list) -> list[np.ndarray]:
    """Parent side: the busy byte of each slot among a result's (loaded) items, as writable uint8[1] views, for
    ``ShardBuilder.add_document(..., release=...)`` to clear once the patches are copied."""
    out = []
    for it in items:
        if is_token(it) and it[0] == "slot":
            flag = _flags.get(it[1])
            if flag is None:
                flag = _flags[it[1]] = np.frombuffer(_maps[it[1]], np.uint8, 1, 0)
            out.append(flag)
    return out


def discard(items: list) -> None:
    """Parent side: free the handoff files of a result that is not used."""
    for it in items:
        if is_token(it):
            if it[0] == "slot":
                load(it)  # maps it if needed
                release([it])
            else:
                Path(it[1]).unlink(missing_ok=True)


def forget_maps() -> None:
    """Parent side, end of a build: drop the slot mappings (unmapped once no view references them)."""
    _maps.clear()
    _flags.clear()


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
