"""The shard builder at the CLI level (python -m tools.preprocess): all four source kinds (+ .gz/.zst), every record
accounted for, bit-exact images,
Megatron's IndexedDataset reading the output, exact skip counts on a corrupt corpus, determinism across worker
counts, kill-and-resume byte-identity, validate and inspect. (C++ packing invariants: tests/test_packer.py.)"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image

from megatron_solo.data.shards import ShardSet
from megatron_solo.format.image import load_and_resize
from megatron_solo.format.tokens import SoloTokenizer, train_sentencepiece
from megatron_solo.preprocess import handoff
from megatron_solo.preprocess.build import KILL_AT_RECORD_ENV, BuildConfig, build
from megatron_solo.preprocess.inspect_pack import KIND_COLOURS, render_pack
from megatron_solo.preprocess.validate import validate

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "megatron_solo" / "demo_data" / "corpus.txt"
S = 256  # seq_length of the test builds


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return train_sentencepiece([CORPUS], tmp_path_factory.mktemp("tok") / "solo.model", 1000, extend=True)


@pytest.fixture(scope="module")
def tok(tok_path) -> SoloTokenizer:
    return SoloTokenizer(tok_path)


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, "PNG")
    return buf.getvalue()


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat(*parts) -> str:
    content = [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": p[0]}}
        for p in parts
    ]
    return json.dumps({"messages": [{"role": "user", "content": content}]})


def make_corpus(d: Path, seed: int = 0) -> tuple[list[str], list[tuple[str, list]]]:
    """Good records of every kind. Returns (--source specs, expected documents [(record id, [text str | image
    source])] in record order) - the expectation is built here independently of the tool."""
    rng = np.random.default_rng(seed)
    lines = [ln for ln in CORPUS.read_text().splitlines() if ln.strip()]
    expected: list[tuple[str, list]] = []

    def noise(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    # chat JSONL: data URLs and relative file paths, 0-2 images, each followed by text
    (d / "img").mkdir()
    recs = []
    for i in range(24):
        parts, items = [], []  # what the record says / what the document must hold
        for k in range(int(rng.integers(0, 3))):
            img = noise(int(rng.integers(20, 140)), int(rng.integers(20, 140)))
            if k % 2 == 0:
                parts.append((data_url(png(img)),))
                items.append(png(img))
            else:
                (d / "img" / f"c{i}_{k}.png").write_bytes(png(img))
                parts.append((f"img/c{i}_{k}.png",))
                items.append(str(d / "img" / f"c{i}_{k}.png"))
            text = lines[(i * 3 + k) % len(lines)][: int(rng.integers(10, 120))]
            parts.append(text)
            items.append(text)
        if not parts:
            parts, items = [lines[i][:200]], [lines[i][:200]]
        recs.append(chat(*parts))
        expected.append((f"{d / 'chat.jsonl'}:{i + 1}", items))
    (d / "chat.jsonl").write_text("\n".join(recs) + "\n")

    # text JSONL, gzipped; one text longer than a pack (split into pieces)
    texts = [lines[i + 40][: 50 + 7 * i] for i in range(12)] + [" ".join(lines[100:110])]
    with gzip.open(d / "text.jsonl.gz", "wt") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    expected += [(f"{d / 'text.jsonl.gz'}:{i + 1}", [t]) for i, t in enumerate(texts)]

    # text JSONL, zstd
    ztexts = [lines[200 + i][:90] for i in range(5)]
    (d / "text2.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in ztexts).encode())
    )
    expected += [(f"{d / 'text2.jsonl.zst'}:{i + 1}", [t]) for i, t in enumerate(ztexts)]

    # imagefolder + class-name mapping (order: seeded shuffle, so expectation is matched by id below)
    names = {"n001": "red fox", "n002": "tench"}
    (d / "classes.txt").write_text("".join(f"{k} {v}\n" for k, v in names.items()))
    for cls in names:
        (d / "folder" / cls).mkdir(parents=True)
        for j in range(4):
            p = d / "folder" / cls / f"{j}.jpg"
            p.write_bytes(jpeg(noise(300, 280) if j == 3 else noise(50 + 10 * j, 70)))  # 300x280: tmpfs handoff
            expected.append((f"{d / 'folder'}:{cls}/{j}.jpg", [str(p), names[cls]]))

    # WebDataset tar: jpg+txt and png+json samples
    with tarfile.open(d / "data.tar", "w") as tar:
        for j in range(5):
            img = noise(40 + 8 * j, 64)
            members = {f"s{j:03d}.{'jpg' if j % 2 else 'png'}": jpeg(img) if j % 2 else png(img)}
            cap = lines[300 + j][:80]
            members[f"s{j:03d}.txt" if j % 2 else f"s{j:03d}.json"] = (
                cap.encode() if j % 2 else json.dumps({"caption": cap}).encode()
            )
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            expected.append((f"{d / 'data.tar'}:s{j:03d}", [list(members.values())[0], cap]))

    specs = [
        f"chat:{d / 'chat.jsonl'}",
        f"text:{d / 'text.jsonl.gz'},{d / 'text2.jsonl.zst'}",
        f"imagefolder:{d / 'folder'}",
        f"wds:{d / 'data.tar'}",
    ]
    return specs, expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    specs, expected = make_corpus(d)
    return d, specs, expected


def cfg_for(out: Path, specs, tok_path, corpus_dir: Path, **kw) -> BuildConfig:
    kw.setdefault("workers", 2)
    kw.setdefault("shard_size_packs", 3)
    kw.setdefault("class_names", str(corpus_dir / "classes.txt"))
    return BuildConfig(
        sources=specs,
        tokenizer=str(tok_path),
        out=str(out),
        seq_length=S,
        buffer_docs=64,
        quiet=True,
        chunk_size=4,
        **kw,
    )


@pytest.fixture(scope="module")
def built(corpus, tok_path, tmp_path_factory):
    d, specs, expected = corpus
    out = tmp_path_factory.mktemp("built") / "set"
    man = build(cfg_for(out, specs, tok_path, d))
    return out, man


# --- independent reference --------------------------------------------------------------------------------------


def ref_patches(img: np.ndarray) -> np.ndarray:
    n_h, n_w = img.shape[0] // 32, img.shape[1] // 32
    return img.reshape(n_h, 32, n_w, 32, 3).transpose(0, 2, 4, 1, 3).reshape(n_h * n_w, 3072)


def ref_document(items: list, tok: SoloTokenizer) -> tuple[list[int], bytes]:
    """[BOS] + text ids / <vision> rows joined by <vrow_sep> </vision> + [EOS], and the patch bytes in order."""
    ids, patches = [tok.bos_id], []
    for it in items:
        if isinstance(it, str) and not (it.startswith("/") and Path(it).exists()):
            ids += tok.encode(it)
            continue
        img = load_and_resize(it)
        n_h, n_w = img.shape[0] // 32, img.shape[1] // 32
        ids.append(tok.vision_id)
        for r in range(n_h):
            ids += ([tok.row_sep_id] if r else []) + [tok.vpatch_id] * n_w
        ids.append(tok.vision_end_id)
        patches.append(ref_patches(img).tobytes())
    return ids + [tok.eos_id], b"".join(patches)


def output_documents(ss: ShardSet, vpatch: int) -> list[tuple[list[int], bytes]]:
    docs = []
    for i in range(len(ss)):
        p = ss[i]
        assert p.tokens.shape == (S,) and int(p.cu_seqlens[-1]) <= S
        p0 = 0
        for a, b in zip(p.cu_seqlens[:-1], p.cu_seqlens[1:]):
            t = p.tokens[a:b]
            n = int((t == vpatch).sum())
            docs.append((t.tolist(), p.patches[p0 : p0 + n].tobytes()))
            p0 += n
        assert p0 == len(p.patches)
    return docs


# --- tests --------------------------------------------------------------------------------------------------------


def test_every_record_appears_exactly_once_bit_exact(built, corpus, tok):
    out, man = built
    _, _, expected = corpus
    ss = ShardSet(out)
    assert len(ss) == man["counts"]["packs"] and len(man["shards"]) >= 2
    got = output_documents(ss, tok.vpatch_id)
    whole = Counter((tuple(t), p) for t, p in got if t[0] == tok.bos_id and t[-1] == tok.eos_id)
    pieces = [(t, p) for t, p in got if not (t[0] == tok.bos_id and t[-1] == tok.eos_id)]
    want, split = Counter(), []
    for _, items in expected:
        ids, patches = ref_document(items, tok)
        if len(ids) > S:
            split.append(ids)
        else:
            want[(tuple(ids), patches)] += 1
    assert whole == want  # every document exactly once, images equal to the resized inputs bit for bit
    assert len(split) == 1 and man["counts"]["text_docs_split"] == 1
    assert sorted(sum((t for t, _ in pieces), [])) == sorted(split[0])  # pieces carry exactly the long text
    assert man["skipped"]["total"] == 0 and man["counts"]["input_records"] == len(expected)


def test_shards_read_by_megatron_indexed_dataset(built, tok):
    out, man = built
    total_patches = 0
    for e in man["shards"]:
        tokens = IndexedDataset(str(out / f"{e['prefix']}.tokens"))
        patches = IndexedDataset(str(out / f"{e['prefix']}.patches"))
        assert len(tokens) == e["packs"] and np.all(tokens.sequence_lengths == S)
        n = sum(int((tokens[i] == tok.vpatch_id).sum()) for i in range(len(tokens)))
        assert n * 3072 == int(patches.sequence_lengths.sum()) == e["patches"] * 3072
        total_patches += n
    c = man["counts"]
    assert total_patches == c["patches"]
    assert c["tokens_total"] == c["tokens_text"] + c["tokens_vision"] and c["slots"] == c["packs"] * S
    assert c["fill"] == pytest.approx(c["tokens_total"] / c["slots"], abs=1e-6)
    assert man["tokenizer"]["sha256"] == tok.checksum and man["seq_length"] == S
    assert len(man["sources"]) == 4


def test_validate_ok_then_catches_flipped_byte(built, tmp_path):
    out, man = built
    problems, report = validate(out)
    assert problems == [] and "checksums verified" in report
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(out), str(bad)], check=True)
    f = bad / f"{man['shards'][0]['prefix']}.tokens.bin"
    data = bytearray(f.read_bytes())
    data[5] ^= 0x01
    f.write_bytes(bytes(data))
    problems, _ = validate(bad)
    assert any("checksum mismatch" in p for p in problems)
    r = subprocess.run(
        [sys.executable, "-m", "tools.preprocess", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 1 and "checksum mismatch" in r.stderr and "INVALID" in r.stderr
    # Structure checks alone: a <vpatch> without its patch is caught even when checksums are skipped.
    docs = IndexedDataset(str(bad / f"{man['shards'][0]['prefix']}.docs"))
    n_real = int(docs[0][-1])  # (IndexedDataset closes its mmap when collected: read the value while it lives)
    del docs
    tokens = np.frombuffer(bytes(data), dtype=np.int32).copy()
    tokens[n_real - 2] = json.loads((bad / f"{man['shards'][0]['prefix']}.json").read_text())["token_ids"]["vpatch"]
    f.write_bytes(tokens.tobytes())
    problems, _ = validate(bad, checksums=False)
    assert any("<vpatch> tokens" in p for p in problems)


def test_inspect_writes_png(built, tok_path, tmp_path):
    out, man = built
    ss = ShardSet(out)
    i = next(k for k in range(len(ss)) if len(ss[k].patches))
    png_path = tmp_path / "pack.png"
    msg = render_pack(out, i, png_path, tokenizer=str(tok_path))
    assert "pack" in msg and png_path.exists()
    im = np.asarray(Image.open(png_path).convert("RGB"))
    assert im.shape[1] == 1280
    colours = {tuple(c) for c in im.reshape(-1, 3)[::7].tolist()}
    assert KIND_COLOURS["patch"] in colours and KIND_COLOURS["text"] in colours


def write_corrupt(d: Path) -> tuple[list[str], dict[str, int]]:
    """One bad record of every kind among good ones; returns specs and the exact expected skip counts."""
    ok = np.full((40, 40, 3), 200, np.uint8)
    good_png = png(ok)
    truncated = png(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:300]
    bomb = d / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 Mpx > the 64 Mpx limit, a few KB on disk
    big = np.zeros((640, 640, 3), np.uint8)  # 400 patches > S: images alone exceed a pack
    (d / "good.png").write_bytes(good_png)
    chat_lines = [
        chat("fine", (data_url(good_png),)),
        chat("garbage image", (data_url(b"this is not an image at all"),)),  # corrupt_image
        chat("truncated", (data_url(truncated),)),  # corrupt_image
        chat("bad b64", ("data:image/png;base64,@@@not-base64@@@",)),  # bad_base64
        chat("missing", ("does_not_exist.png",)),  # missing_file
        chat("bomb", ("bomb.png",)),  # decompression_bomb
        chat("too big", (data_url(png(big)),)),  # images_exceed_pack (packer)
        chat("path ok", ("good.png",)),
        '{"messages": [{"role": "user", "content": ',  # bad_json
        json.dumps({"messages": "nope"}),  # bad_record
        chat("remote", ("https://example.com/x.jpg",)),  # unsupported_url
    ]
    (d / "chat.jsonl").write_text("\n".join(chat_lines) + "\n")
    text_lines = [
        json.dumps({"text": "a good line"}).encode(),
        json.dumps({"text": "   "}).encode(),  # empty_text
        b'{"text": "bad \xff\xfe utf8"}',  # invalid_utf8
        b'{"text": "lone \\ud800 surrogate"}',  # invalid_utf8
        b"not json at all",  # bad_json
        json.dumps({"txt": "wrong key"}).encode(),  # bad_record
    ]
    (d / "text.jsonl").write_bytes(b"\n".join(text_lines) + b"\n")
    expected = {
        "corrupt_image": 2,
        "bad_base64": 1,
        "missing_file": 1,
        "decompression_bomb": 1,
        "images_exceed_pack": 1,
        "bad_json": 2,
        "bad_record": 2,
        "unsupported_url": 1,
        "empty_text": 1,
        "invalid_utf8": 2,
    }
    return [f"chat:{d / 'chat.jsonl'}", f"text:{d / 'text.jsonl'}"], expected


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_corrupt_corpus_exact_skip_counts(tok_path, tok, tmp_path):
    specs, expected = write_corrupt(tmp_path)
    man = build(
        cfg_for(tmp_path / "out", specs, tok_path, tmp_path, workers=2, class_names=None, max_skip_fraction=1.0)
    )
    sk = man["skipped"]
    assert sk["by_reason"] == expected and sk["total"] == sum(expected.values())
    assert sk["samples"]["bad_base64"] == [f"{tmp_path / 'chat.jsonl'}:4"]
    assert "does_not_exist.png" in sk["examples"]["missing_file"][0]["error"]
    assert sk["samples"]["invalid_utf8"] == [f"{tmp_path / 'text.jsonl'}:3", f"{tmp_path / 'text.jsonl'}:4"]
    assert man["counts"]["documents"] == 3 and man["counts"]["images"] == 2  # fine, path ok, a good line
    assert man["counts"]["input_records"] == 17
    assert validate(tmp_path / "out")[0] == []
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_deterministic_across_worker_counts(built, corpus, tok_path, tmp_path):
    out, man = built
    d, specs, _ = corpus
    man0 = build(cfg_for(tmp_path / "w0", specs, tok_path, d, workers=0))
    assert man0["shards"] == man["shards"]  # same files (checksum per file), same record ranges
    assert (tmp_path / "w0" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "tools.preprocess", *args], capture_output=True, text=True, cwd=ROOT, env=e, timeout=300
    )


def test_kill_and_resume_is_byte_identical(built, corpus, tok_path, tmp_path):
    out, man = built
    d, specs, _ = corpus
    res_dir = tmp_path / "resumed"
    args = [
        "build",
        "--tokenizer",
        str(tok_path),
        "--out",
        str(res_dir),
        "--seq-length",
        str(S),
        "--workers",
        "2",
        "--shard-size-packs",
        "3",
        "--class-names",
        str(d / "classes.txt"),
        "--buffer-docs",
        "64",
        "--quiet",
    ]
    for s in specs:
        args += ["--source", s]
    assert len(man["shards"]) >= 3
    kill_at = man["shards"][2]["records"][0] + 2  # inside the third shard: two are complete
    r = run_cli(args, {KILL_AT_RECORD_ENV: str(kill_at)})
    assert r.returncode == -9, r.stderr
    killed_pid = int(r.stderr.split("build pid ")[1].split()[0])
    assert not (res_dir / "manifest.json").exists() and (res_dir / "progress.json").exists()
    assert (res_dir / "shard_00001.json").exists() and not (res_dir / "shard_00002.json").exists()
    assert list(res_dir.glob("shard_00002.*.tmp"))  # the killed shard's temp files are left behind
    # Damage shard 1 on disk: resume must keep shard 0 (untouched) and rebuild from shard 1 on.
    kept = res_dir / "shard_00000.patches.bin"
    kept_stat = kept.stat()
    f = res_dir / "shard_00001.docs.bin"
    f.write_bytes(b"\x07" + f.read_bytes()[1:])
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert "kept 1 verified shard" in r.stderr and "rebuilding from shard_00001" in r.stderr
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == (kept_stat.st_ino, kept_stat.st_mtime_ns)
    assert "packs" in r.stdout
    for e in man["shards"]:
        for fname in e["files"]:
            assert (res_dir / fname).read_bytes() == (out / fname).read_bytes(), fname
    assert sorted(p.name for p in res_dir.iterdir()) == sorted(p.name for p in out.iterdir())
    # The killed build's in-flight image handoff files (tmpfs) were removed by the resumed one.
    assert not list(Path("/dev/shm").glob(f"solo_pp_{killed_pid}_*"))
    assert (res_dir / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def test_refuses_an_output_dir_of_another_build(built, corpus, tok_path):
    out, _ = built
    d, specs, _ = corpus
    r = run_cli(
        [
            "build",
            "--source",
            specs[0],
            "--tokenizer",
            str(tok_path),
            "--out",
            str(out),
            "--seq-length",
            str(S),
            "--quiet",
        ]
    )
    assert r.returncode == 2 and "different shard set" in r.stderr


def test_handoff_roundtrip_and_stale_cleanup(tmp_path):
    img = np.random.default_rng(3).integers(0, 256, (320, 288, 3), dtype=np.uint8)
    assert img.nbytes >= handoff.MIN_BYTES
    token = handoff.export(img, str(tmp_path), os.getpid())
    path = Path(token[1])
    assert path.exists() and path.stat().st_size == img.nbytes
    back = handoff.load(token)
    assert not path.exists()  # unlinked as soon as it is mapped
    np.testing.assert_array_equal(back, img)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{handoff.PREFIX}{int(dead.stdout)}_1_0"
    stale.write_bytes(b"x")
    mine = tmp_path / f"{handoff.PREFIX}{os.getpid()}_1_0"
    mine.write_bytes(b"x")
    assert handoff.remove_stale(str(tmp_path)) == 1 and not stale.exists() and mine.exists()
    handoff.remove_own(str(tmp_path), os.getpid())
    assert not mine.exists()


def test_demo_small(tmp_path):
    from megatron_solo.preprocess.demo import build_demo_shards

    res = build_demo_shards(tmp_path / "demo", seq_length=256)
    tok = SoloTokenizer(res["tokenizer"])
    assert tok.vision_id == 1000
    for split in ("train", "valid"):
        ss = ShardSet(res[split])
        assert len(ss) > 0 and ss.seq_length == 256
        c = res[f"{split}_manifest"]["counts"]
        assert c["images"] > 0 and c["tokens_text"] > 0 and c["fill"] > 0.9
        assert res[f"{split}_manifest"]["skipped"]["total"] == 0
    assert len(ShardSet(res["train"])) > 10 * len(ShardSet(res["valid"])) / 2
