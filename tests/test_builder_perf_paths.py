"""The builder's fast paths against independent references: the C++ XXH64 vs python-xxhash and SHA-256 (both code
paths) vs hashlib, the checksums ``ShardBuilder.finish`` reports vs those over the files on disk, unpickled arrays
(equal but not identical dtypes) accepted, and the worker -> parent slot handoff (reuse, busy flag, fallback)."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest
import xxhash

from megatron_solo import _C
from megatron_solo.format.layout import patch_grid
from megatron_solo.format.schema import shard_files
from megatron_solo.preprocess import handoff
from megatron_solo.preprocess import manifest as mf

IDS = dict(bos=1, eos=2, pad=0, vision=500, vpatch=501, row_sep=502, vision_end=503)


@pytest.mark.parametrize("portable", [False, True])
def test_sha256_matches_hashlib(portable):
    rng = np.random.default_rng(0)
    for n in [*range(0, 130), 191, 192, 4095, 65536 + 7, 1 << 20]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        want = "sha256:" + hashlib.sha256(data).hexdigest()
        assert _C.checksum(data, "sha256", portable=portable) == want, n
    arr = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert _C.checksum(arr, "sha256") == "sha256:" + hashlib.sha256(arr.tobytes()).hexdigest()
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.checksum(arr[:, ::2])


def test_xxh64_matches_the_xxhash_package():
    """XXH64 against python-xxhash (the reference C implementation), every tail length and stripe boundary."""
    rng = np.random.default_rng(0)
    for n in [*range(0, 130), 4095, 65536 + 7, 1 << 20]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _C.checksum(data) == "xxh64:" + xxhash.xxh64(data).hexdigest(), n
    assert _C.checksum(b"") == "xxh64:ef46db3751d8e999"  # the spec's value for empty input, seed 0
    with pytest.raises(ValueError, match="'xxh64' or 'sha256'"):
        _C.checksum(b"abc", "md5")


def _build_random_shard(path, checksum: str) -> dict:
    rng = np.random.default_rng(1)
    b = _C.ShardBuilder(str(path / "shard_00000"), 512, IDS, buffer_docs=8, checksum=checksum)
    for i in range(40):
        items = [rng.integers(3, 400, int(rng.integers(1, 60)), dtype=np.int32)]
        if i % 3 == 0:
            items.append(rng.integers(0, 256, (32 * int(rng.integers(1, 4)), 64, 3), dtype=np.uint8))
        # Arrays that crossed a process boundary carry equal but distinct dtype objects: accepted as they are.
        b.add_document(f"r{i}", pickle.loads(pickle.dumps(items)))
    stats = b.finish()
    assert stats["documents"] == 40 and stats["images"] == 14
    return stats


@pytest.mark.parametrize("checksum", ["xxh64", "sha256"])
def test_finish_reports_the_checksum_of_each_written_file(tmp_path, checksum):
    """The digests hashed while writing (chunk by chunk in the writer, or on the hasher thread for sha256) equal
    an independent implementation's over the files read back."""
    stats = _build_random_shard(tmp_path, checksum)
    ref = (lambda b: "xxh64:" + xxhash.xxh64(b).hexdigest()) if checksum == "xxh64" else None
    ref = ref or (lambda b: "sha256:" + hashlib.sha256(b).hexdigest())
    want = {os.path.basename(f): ref(open(f, "rb").read()) for f in shard_files(tmp_path / "shard_00000")}
    assert stats["files"] == want == mf.shard_checksums(tmp_path, "shard_00000", checksum)
    assert list(stats["files"]) == list(want)  # shard_files() order
    assert mf.verify_checksums(tmp_path, stats["files"]) == []
    patches = tmp_path / "shard_00000.patches.bin"
    data = bytearray(patches.read_bytes())
    data[len(data) // 2] ^= 1
    patches.write_bytes(data)
    assert mf.verify_checksums(tmp_path, stats["files"]) == [
        f"{patches}: {checksum} checksum mismatch (file changed or corrupt)"
    ]


def test_bare_sha256_digests_of_older_manifests_still_verify(tmp_path):
    stats = _build_random_shard(tmp_path, "sha256")
    bare = {name: digest.removeprefix("sha256:") for name, digest in stats["files"].items()}
    assert all(":" not in d and len(d) == 64 for d in bare.values())
    assert mf.verify_checksums(tmp_path, bare) == []
    (tmp_path / "shard_00000.json").write_text("{}")
    assert mf.verify_checksums(tmp_path, bare) == [
        f"{tmp_path / 'shard_00000.json'}: sha256 checksum mismatch (file changed or corrupt)"
    ]
    problems = mf.verify_checksums(tmp_path, {"shard_00000.docs.idx": "md5:0123"})
    assert problems == [f"{tmp_path / 'shard_00000.docs.idx'}: unknown checksum algorithm 'md5' in 'md5:0123'"]


def test_patch_grid_items_give_the_same_shard_as_pixels(tmp_path):
    """Workers hand images over patchified ([H/32, W/32, 3072]); the shard must equal one built from the pixels."""
    rng = np.random.default_rng(3)
    docs = []
    for _ in range(30):
        items = [rng.integers(3, 400, int(rng.integers(1, 80)), dtype=np.int32)]
        for _ in range(int(rng.integers(0, 3))):
            items.append(
                rng.integers(0, 256, (32 * int(rng.integers(1, 5)), 32 * int(rng.integers(1, 5)), 3), np.uint8)
            )
        docs.append(items)
    sums = []
    for name, convert in (("pixels", lambda a: a), ("grid", lambda a: patch_grid(a) if a.dtype == np.uint8 else a)):
        b = _C.ShardBuilder(str(tmp_path / name), 256, IDS, buffer_docs=8)
        for i, items in enumerate(docs):
            b.add_document(f"r{i}", [convert(a) for a in items])
        sums.append(sorted(b.finish()["files"].values()))
    assert sums[0] == sums[1]
    out = np.empty((3, 3072), np.uint8)
    with pytest.raises(ValueError, match="out must be"):
        _C.patchify(np.zeros((64, 64, 3), np.uint8), out=out)  # 4 patches do not fit 3
    with pytest.raises(TypeError, match="patch grid"):
        b2 = _C.ShardBuilder(str(tmp_path / "bad"), 256, IDS)
        b2.add_document("bad", [np.zeros((2, 2, 3071), np.uint8)])


def _mixed_docs(seed: int, n: int) -> list[list[np.ndarray]]:
    """Text (int32 and int64, the converted path), pixels and patch grids."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        dtype = np.int64 if i % 4 == 0 else np.int32
        items = [rng.integers(3, 400, int(rng.integers(1, 80))).astype(dtype)]
        for k in range(int(rng.integers(0, 3))):
            img = rng.integers(0, 256, (32 * int(rng.integers(1, 5)), 32 * int(rng.integers(1, 5)), 3), np.uint8)
            items.append(patch_grid(img) if (i + k) % 2 else img)
        docs.append(items)
    return docs


def test_queued_add_document_gives_the_same_shard_and_frees_each_slot(tmp_path):
    """add_document(..., release=flags) returns at once; the intake thread copies and packs later, in call order,
    from arrays the builder keeps alive (the caller drops its own), and clears each flag (a worker's slot-busy byte)
    once its document is copied. The shard equals the one built with synchronous calls."""
    docs = _mixed_docs(5, 60)
    (tmp_path / "sync").mkdir()
    (tmp_path / "queued").mkdir()
    b = _C.ShardBuilder(str(tmp_path / "sync" / "s"), 256, IDS, buffer_docs=8)
    for i, items in enumerate(docs):
        b.add_document(f"r{i}", items)
    want = b.finish()
    b = _C.ShardBuilder(str(tmp_path / "queued" / "s"), 256, IDS, buffer_docs=8)
    flags = []
    for i, items in enumerate(docs):
        doc_flags = [np.ones(1, np.uint8) for a in items if a.dtype == np.uint8]
        flags += doc_flags
        b.add_document(f"r{i}", [a.copy() for a in items], release=doc_flags)  # the copies die here
    got = b.finish()
    assert got == want
    assert flags and all(f[0] == 0 for f in flags)


def test_queued_add_document_checks_shapes_in_the_call_and_abort_frees_queued_slots(tmp_path):
    b = _C.ShardBuilder(str(tmp_path / "s"), 256, IDS)
    text = np.arange(3, 20, dtype=np.int32)
    with pytest.raises(ValueError, match="record bad, item 1"):
        b.add_document("bad", [text, np.zeros((33, 32, 3), np.uint8)], release=[])
    with pytest.raises(TypeError, match="release flags"):
        b.add_document("bad-flag", [text], release=[np.ones(1, np.int32)])
    flags = [np.ones(1, np.uint8) for _ in range(300)]
    grid = np.zeros((2, 2, 3072), np.uint8)
    for i, f in enumerate(flags):
        b.add_document(f"r{i}", [text, grid], release=[f])
    b.abort()  # queued documents are dropped, their slots handed back all the same
    assert all(f[0] == 0 for f in flags)
    assert list(tmp_path.iterdir()) == []
    b = _C.ShardBuilder(str(tmp_path / "s"), 256, IDS)
    b.add_document("ok", [text], release=[])
    assert b.stats()["input_documents"] == 1  # stats() waits for the intake thread
    assert b.finish()["documents"] == 1


def test_big_endian_tokens_are_converted_not_misread(tmp_path):
    b = _C.ShardBuilder(str(tmp_path / "s"), 64, IDS)
    b.add_document("be", [np.arange(3, 10, dtype=">i4")])
    b.finish()
    tokens = np.fromfile(tmp_path / "s.tokens.bin", dtype=np.int32)
    assert tokens[:9].tolist() == [1, 3, 4, 5, 6, 7, 8, 9, 2]


def test_slot_handoff_reuses_slots_and_honours_the_busy_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(handoff, "_slots", [])
    monkeypatch.setattr(handoff, "_slot_bytes", 0)
    monkeypatch.setattr(handoff, "_maps", {})
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 256, (320, 288, 3), dtype=np.uint8) for _ in range(2))
    d, pid = str(tmp_path), os.getpid()
    grid = patch_grid  # images travel as their patch grid (layout.patch_grid), patchified by the worker
    np.testing.assert_array_equal(_C.unpatchify(grid(a).reshape(-1, _C.PATCH_DIM), 10, 9), a)
    ta = handoff.export_slot(a, d, pid)
    tb = handoff.export_slot(b, d, pid)  # a's slot is busy: a second slot
    assert ta[0] == tb[0] == "slot" and ta[1] != tb[1]
    np.testing.assert_array_equal(handoff.load(ta), grid(a))
    np.testing.assert_array_equal(handoff.load(tb), grid(b))
    handoff.release([ta])
    tc = handoff.export_slot(b[::-1].copy(), d, pid)  # reuses a's slot, now free
    assert tc[1] == ta[1] and len(os.listdir(d)) == 2
    np.testing.assert_array_equal(handoff.load(tc), grid(b[::-1].copy()))
    np.testing.assert_array_equal(handoff.load(tb), grid(b))  # untouched
    # All slots busy and the byte cap reached: a one-shot file, unlinked when loaded.
    monkeypatch.setattr(handoff, "MAX_SLOT_BYTES", handoff._slot_bytes)
    td = handoff.export_slot(a, d, pid)
    assert td[0] == "handoff"
    np.testing.assert_array_equal(handoff.load(td), grid(a))
    assert not os.path.exists(td[1])
    handoff.forget_maps()
    handoff.remove_own(d, pid)
    assert os.listdir(d) == []


def test_extension_uses_no_iostreams():
    """A GPU node's toolchain links libstdc++ statically into _C; iostreams there (sidecar JSON via ostringstream)
    crashed next to torch's libstdc++.so. That setup cannot be reproduced on CPU CI, so keep iostreams out."""
    import re
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    offenders = [
        p.name
        for p in sorted(csrc.glob("*.[ch]*"))
        if re.search(r"#include\s*<(sstream|iostream|fstream|iomanip|locale)>", p.read_text())
    ]
    assert offenders == []


def test_a_write_error_surfaces_and_leaves_no_shard(tmp_path):
    """The writer thread fails (files capped at 1 MiB by RLIMIT_FSIZE, in a child process): the error reaches the
    caller of add_document/finish, the producer never hangs on a full queue, and no shard file is left behind."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import resource, signal, numpy as np
        from megatron_solo import _C
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        b = _C.ShardBuilder({str(tmp_path / "s")!r}, 256, {IDS!r}, buffer_docs=4)
        img = np.zeros((128, 128, 3), np.uint8)
        try:
            for i in range(400):  # ~20 MB of patches, far past the cap, well past the 8 queued packs
                b.add_document(f"r{{i}}", [np.arange(3, 20, dtype=np.int32), img])
            b.finish()
        except RuntimeError as e:
            print("ERROR", e)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERROR cannot write" in res.stdout and "File too large" in res.stdout, res.stdout
    assert os.listdir(tmp_path) == []  # temp files removed by abort (the builder's destructor)
