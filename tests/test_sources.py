"""Source kinds built from files written by the libraries that make those formats in the wild (``datasets``,
``webdataset.TarWriter``, pyarrow, LLaVA-shaped JSON), read back through megatron-core's ``IndexedDataset``:
images bit-exact to the resize rule, every text exactly once, interleaved order kept, stored targets per loss
policy; the CLI's per-source options; the no-silent-build failures (exit code and message); the readers' byte /
row-group ranges (what a partitioned build splits on)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from PIL import Image as PILImage

from megatron_solo.data.shards import ShardSet
from megatron_solo.format.chat_template import Image, Turn, render, token_ids
from megatron_solo.format.image import load_and_resize
from megatron_solo.format.tokens import SoloTokenizer, train_sentencepiece
from megatron_solo.preprocess.build import BuildConfig, BuildError, build
from megatron_solo.preprocess.cli import main as cli_main
from megatron_solo.preprocess.sources import SourceError, group_words, make_sources, parse_spec
from megatron_solo.preprocess.sources import files as sfiles

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "megatron_solo" / "demo_data" / "corpus.txt"
S = 512


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return train_sentencepiece([CORPUS], tmp_path_factory.mktemp("tok") / "solo.model", 1000, extend=True)


@pytest.fixture(scope="module")
def tok(tok_path) -> SoloTokenizer:
    return SoloTokenizer(tok_path)


RNG = np.random.default_rng(7)


def noise(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def encoded(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(img, "RGB").save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def cfg(out: Path, sources: list[str], tok_path: Path, **kw) -> BuildConfig:
    kw.setdefault("workers", 1)
    return BuildConfig(sources=sources, tokenizer=str(tok_path), out=str(out), seq_length=S, shard_size_packs=4,
                       buffer_docs=64, chunk_size=4, quiet=True, **kw)  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process (once per file: it costs seconds to start)."""
    return subprocess.run([sys.executable, "-m", "tools.preprocess", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip


class Cli:
    """``main(argv)`` in this process: exit code, stdout, stderr (what a user sees)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        self.capsys.readouterr()
        code = cli_main(list(args))
        out = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture
def cli(capsys) -> Cli:
    return Cli(capsys)


# --- independent reference + reading back through IndexedDataset ----------------------------------------------


def layout(img: np.ndarray, tok: SoloTokenizer) -> list[int]:
    n_h, n_w = img.shape[0] // 32, img.shape[1] // 32
    ids = [tok.vision_id]
    for r in range(n_h):
        ids += ([tok.row_sep_id] if r else []) + [tok.vpatch_id] * n_w
    return ids + [tok.vision_end_id]


def patches_of(img: np.ndarray) -> bytes:
    n_h, n_w = img.shape[0] // 32, img.shape[1] // 32
    return img.reshape(n_h, 32, n_w, 32, 3).transpose(0, 2, 4, 1, 3).reshape(n_h * n_w, 3072).tobytes()


def ref_doc(parts: list, tok: SoloTokenizer, eos_target: bool = True) -> tuple[tuple, bytes, tuple]:
    """(ids, patch bytes, targets) of ``[BOS] parts [EOS]``; a part is ``("t", text, target)``, ``("i", image source)``
    or ``("e", target)`` (an end-of-turn EOS)."""
    ids, tg, patches = [tok.bos_id], [0], b""
    for p in parts:
        if p[0] == "t":
            run = tok.encode(p[1])
            ids, tg = ids + run, tg + [int(p[2])] * len(run)
        elif p[0] == "e":
            ids, tg = ids + [tok.eos_id], tg + [int(p[1])]
        else:
            img = load_and_resize(p[1])
            lay = layout(img, tok)
            ids, tg, patches = ids + lay, tg + [0] * len(lay), patches + patches_of(img)
    return tuple(ids + [tok.eos_id]), patches, tuple(tg + [int(eos_target)])


def read_docs(out: Path, vpatch: int) -> list[tuple[tuple, bytes]]:
    """Every document of a shard set as (ids, patch bytes), read with megatron-core's IndexedDataset."""
    man = json.loads((out / "manifest.json").read_text())
    docs = []
    for sh in man["shards"]:
        p = out / sh["prefix"]
        tokens, cus, patches = (IndexedDataset(f"{p}.{part}") for part in ("tokens", "docs", "patches"))
        for i in range(len(tokens)):
            t, cu, pt = tokens[i], cus[i], patches[i]
            off = 0
            for a, b in zip(cu[:-1], cu[1:]):
                ids = t[a:b]
                n = int((ids == vpatch).sum()) * 3072
                docs.append((tuple(int(x) for x in ids), pt[off : off + n].tobytes()))
                off += n
            assert off == len(pt)
        del tokens, cus, patches
    return docs


def read_targets(out: Path) -> list[tuple[tuple, tuple]]:
    """(ids, targets) of every document, targets as the reader (``Pack.targets``) gives them."""
    ss = ShardSet(out)
    docs = []
    for i in range(len(ss)):
        p = ss[i]
        for a, b in zip(p.cu_seqlens[:-1], p.cu_seqlens[1:]):
            docs.append((tuple(int(x) for x in p.tokens[a:b]), tuple(int(x) for x in p.targets[a:b])))
    return docs


def assert_docs(out: Path, tok: SoloTokenizer, want: list[tuple[tuple, bytes, tuple]]) -> None:
    got = read_docs(out, tok.vpatch_id)
    assert Counter(got) == Counter((ids, p) for ids, p, _ in want)  # every document exactly once, bit-exact
    assert Counter(read_targets(out)) == Counter((ids, tg) for ids, _, tg in want)  # the stored loss targets


# --- llava --------------------------------------------------------------------------------------------------------


def llava_pretrain(d: Path, n: int = 6) -> tuple[Path, Path, list]:
    """A JSON array in blip_laion_cc_sbu_558k.json's shape (pretty-printed), images under a separate root in
    ``00453/004539375.jpg`` style; one record has no image (a text conversation). Returns (json, image root,
    expected parts per record)."""
    lines = [ln for ln in CORPUS.read_text().splitlines() if ln.strip()]
    root = d / "images"
    recs, want = [], []
    for i in range(n):
        rid = f"00{453 + i}{i:05d}"
        cap = lines[10 + i][:90]
        if i == 3:
            recs.append({"id": rid, "conversations": [{"from": "human", "value": "Say something."},
                                                      {"from": "gpt", "value": cap}]})  # fmt: skip
            want.append([("t", "Say something.", False), ("t", cap, True)])
            continue
        rel = f"00{453 + i}/{rid}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encoded(noise(60 + 20 * i, 90), "JPEG"))
        prompt = "<image>\nWrite a brief caption." if i % 2 == 0 else "Describe the image.\n<image>"
        recs.append({"id": rid, "image": rel, "conversations": [{"from": "human", "value": prompt},
                                                                {"from": "gpt", "value": cap}]})  # fmt: skip
        img = ("i", str(root / rel))
        if i % 2 == 0:
            want.append([img, ("t", "\nWrite a brief caption.", False), ("t", cap, True)])
        else:
            want.append([("t", "Describe the image.\n", False), img, ("t", cap, True)])
    path = d / "blip_laion_cc_sbu_558k.json"
    path.write_text(json.dumps(recs, indent=4, ensure_ascii=False))
    return path, root, want


def test_llava_pretrain_json_array_via_cli(tok_path, tok, tmp_path, cli):
    path, root, want = llava_pretrain(tmp_path)
    out = tmp_path / "out"
    r = cli("build", "--source", f"llava:{path}", "--image-root", str(root), "--tokenizer", str(tok_path),
                "--out", str(out), "--seq-length", str(S), "--workers", "1", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    src = man["sources"][0]
    assert src["options"] == {"image-root": str(root), "loss-on": "assistant", "template": "plain"}
    assert src["counts"] == {"records": 6, "documents": 6}
    assert_docs(out, tok, [ref_doc(p, tok) for p in want])  # default loss-on=assistant: the caption (and EOS) only


def test_llava_665k_multiturn_mistral_matches_chat_template(tok_path, tok, tmp_path):
    """LLaVA-665K style JSONL (multi-turn, <image> in the first human turn, text-only records, a system turn):
    template=mistral loss-on=assistant. The ids equal chat_template.token_ids (what the processor and generate use),
    and the targets are exactly each answer's tokens and the EOS closing it."""
    lines = [ln for ln in CORPUS.read_text().splitlines() if ln.strip()]
    img = noise(70, 100)
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "000000033471.jpg").write_bytes(encoded(img, "JPEG"))
    convs = [
        [("human", "<image>\nWhat is in the picture?"), ("gpt", lines[1][:60]), ("human", "And the colours?"),
         ("gpt", lines[2][:50])],
        [("system", "Answer briefly."), ("human", "Name a colour."), ("gpt", "Blue.")],
        [("human", "Tell me more."), ("gpt", lines[3][:70])],
    ]  # fmt: skip
    recs = [{"id": "a", "image": "coco/000000033471.jpg"}, {"id": "b"}, {"id": "c"}]
    with open(tmp_path / "llava_v1_5_mix665k.jsonl", "w") as f:
        for rec, conv in zip(recs, convs):
            rec["conversations"] = [{"from": a, "value": v} for a, v in conv]
            f.write(json.dumps(rec) + "\n")
    spec = f"llava:{tmp_path / 'llava_v1_5_mix665k.jsonl'},template=mistral,loss-on=assistant"
    out = tmp_path / "out"
    man = build(cfg(out, [spec], tok_path))
    assert man["counts"]["documents"] == 3
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    image = load_and_resize(str(tmp_path / "coco" / "000000033471.jpg"))
    want = []
    for k, conv in enumerate(convs):
        turns = []
        for a, v in conv:
            parts = [Image(image), v.replace("<image>", "", 1)] if "<image>" in v else [v]
            turns.append(Turn(roles[a], tuple(parts)))
        rendered = render(turns, "mistral", "assistant")
        ids, tg = token_ids(rendered, tok.encode, lambda im: layout(im, tok), tok.bos_id, tok.eos_id)
        want.append((tuple(ids), patches_of(image) if k == 0 else b"", tuple(tg)))
        # independent of the template module: the targets are " answer" runs and their EOS, nothing else
        answers = [t for a, v in conv if a == "gpt" for t in tok.encode(" " + v.strip()) + [tok.eos_id]]
        assert [i for i, t in zip(ids, tg) if t] == answers
    assert_docs(out, tok, want)


# --- Hugging Face datasets: parquet (to_parquet) and arrow (save_to_disk) ------------------------------------------


def test_parquet_llava_onevision_layout_from_datasets(tok_path, tok, tmp_path):
    """A datasets ``Image`` feature with embedded bytes + LLaVA-OneVision's ``conversations`` column, written with
    ``Dataset.to_parquet``; found without a mapping; images bit-exact; per-CPU it is the same path as JPEG files."""
    datasets = pytest.importorskip("datasets")
    imgs = [noise(64 + 16 * k, 80) for k in range(3)]
    rows = {
        "id": [f"ov{k}" for k in range(3)],
        "image": [PILImage.fromarray(im) for im in imgs],
        "conversations": [
            [{"from": "human", "value": f"<image>\nQuestion {k}?"}, {"from": "gpt", "value": f"Answer {k}."}]
            for k in range(3)
        ],  # fmt: skip
        "data_source": ["test"] * 3,
    }
    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
                               "data_source": datasets.Value("string")})  # fmt: skip
    ds = datasets.Dataset.from_dict(rows, features=feats)
    ds.to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    out = tmp_path / "out"
    man = build(cfg(out, [f"parquet:{tmp_path / 'train-00000-of-00001.parquet'}"], tok_path))
    src = man["sources"][0]
    assert src["mapping"] == {"mode": "conversations", "text": "conversations", "image": "image"}
    want = []
    for k in range(3):
        png = ds.with_format("arrow")[k]["image"][0]["bytes"].as_py()  # the bytes datasets embedded
        want.append(ref_doc([("i", png), ("t", f"\nQuestion {k}?", False), ("t", f"Answer {k}.", True)], tok))
    assert_docs(out, tok, want)


def test_arrow_save_to_disk_the_cauldron_layout(tok_path, tok, tmp_path):
    """The Cauldron's layout (``images``: a list of Image, ``texts``: a list of {user, assistant, source}) saved with
    ``save_to_disk``: the directory is read through its state.json; images go first."""
    datasets = pytest.importorskip("datasets")
    imgs = [[noise(40, 70)], [noise(50, 50), noise(33, 90)], []]
    texts = [[{"user": "What is it?", "assistant": "Noise.", "source": "x"}],
             [{"user": "Compare.", "assistant": "Both noise.", "source": "x"},
              {"user": "Sure?", "assistant": "Yes.", "source": "x"}],
             [{"user": "No image here.", "assistant": "Fine.", "source": "x"}]]  # fmt: skip
    feats = datasets.Features({"images": datasets.Sequence(datasets.Image()),
                               "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                          "source": datasets.Value("string")}]})  # fmt: skip
    ds = datasets.Dataset.from_dict({"images": [[PILImage.fromarray(i) for i in row] for row in imgs], "texts": texts},
                                    features=feats)  # fmt: skip
    ds.save_to_disk(str(tmp_path / "vqav2"))
    out = tmp_path / "out"
    man = build(cfg(out, [f"arrow:{tmp_path / 'vqav2'}"], tok_path))
    assert man["sources"][0]["mapping"]["mode"] == "texts"
    raw = ds.with_format("arrow")
    want = []
    for k in range(3):
        pngs = [x["bytes"] for x in raw[k]["images"][0].as_py()]
        parts = [("i", b) for b in pngs]
        for ex in texts[k]:
            parts += [("t", ex["user"], False), ("t", ex["assistant"], True)]
        want.append(ref_doc(parts, tok))
    assert_docs(out, tok, want)
    # A DatasetDict directory is refused with its splits named.
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceError, match="DatasetDict .splits train, test"):
        build(cfg(tmp_path / "o2", [f"arrow:{tmp_path / 'dd'}"], tok_path))


def test_parquet_caption_mapping_and_unknown_columns(tok_path, tok, tmp_path):
    """pyarrow-written parquet with explicit ``image=`` / ``caption=`` mapping; columns that fit no mapping are an
    error naming the file and its columns."""
    imgs = [encoded(noise(40, 40)), encoded(noise(64, 32), "JPEG")]
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"jpg": pa.array([{"bytes": b, "path": None} for b in imgs], img_t),
                      "alt_text": ["a small square", "a tall one"]})  # fmt: skip
    pq.write_table(table, tmp_path / "laion.parquet", row_group_size=1)
    out = tmp_path / "out"
    build(cfg(out, [f"parquet:{tmp_path / 'laion.parquet'},image=jpg,caption=alt_text"], tok_path))
    assert_docs(
        out, tok, [ref_doc([("i", b), ("t", c, True)], tok) for b, c in zip(imgs, ["a small square", "a tall one"])]
    )
    with pytest.raises(SourceError, match=r"laion.parquet: no text column found \(columns: jpg, alt_text\)"):
        build(cfg(tmp_path / "o2", [f"parquet:{tmp_path / 'laion.parquet'}"], tok_path))


# --- WebDataset --------------------------------------------------------------------------------------------------


def test_wds_tarwriter_shards_with_braces(tok_path, tok, tmp_path, cli):
    """Shards written by ``webdataset.TarWriter`` (jpg + txt, png + json), named 00000.tar..; the brace spec works
    quoted (expanded by us) and as the shell expands it (several words after one --source): one source."""
    wds = pytest.importorskip("webdataset")
    (tmp_path / "cc3m").mkdir()
    want = []
    for s in range(3):
        with wds.TarWriter(str(tmp_path / "cc3m" / f"{s:05d}.tar")) as w:
            for j in range(2):
                img, cap = noise(48 + 8 * j, 64), f"caption {s} {j}"
                if j == 0:
                    data = encoded(img, "JPEG")
                    w.write({"__key__": f"{s:05d}{j:04d}", "jpg": data, "txt": cap})
                else:
                    data = encoded(img)
                    w.write({"__key__": f"{s:05d}{j:04d}", "png": data, "json": {"caption": cap, "url": "http://x"}})
                want.append(ref_doc([("i", data), ("t", cap, True)], tok))
    quoted = f"wds:{tmp_path / 'cc3m'}/{{00000..00002}}.tar"
    out = tmp_path / "out"
    r = run_cli("build", "--source", quoted, "--tokenizer", str(tok_path), "--out", str(out), "--seq-length", str(S),
                "--workers", "1", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert_docs(out, tok, want)
    # What bash makes of the unquoted spec: one word per shard after one --source -> the same single source.
    words = [f"wds:{tmp_path / 'cc3m'}/{s:05d}.tar" for s in range(3)]
    out2 = tmp_path / "out2"
    r = cli("build", "--source", *words, "--tokenizer", str(tok_path), "--out", str(out2), "--seq-length", str(S),
                "--workers", "1", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    m1, m2 = (json.loads((o / "manifest.json").read_text()) for o in (out, out2))
    assert len(m2["sources"]) == 1 and m1["shards"] == m2["shards"]


# --- interleaved: OBELICS, MMC4 ----------------------------------------------------------------------------------


def test_obelics_parquet_order_kept_urls_dropped(tok_path, tok, tmp_path):
    """OBELICS-shaped parquet (pyarrow): aligned images / texts; images as bytes, local paths and URLs. Document order
    is kept; URL-only images are dropped and counted, their documents kept."""
    a, b = encoded(noise(40, 90)), encoded(noise(70, 40), "JPEG")
    (tmp_path / "local.png").write_bytes(encoded(noise(35, 35)))
    local = str(tmp_path / "local.png")
    rows = [
        {"images": [None, a, None, None, local], "texts": ["Intro.", None, "Middle.", "More.", None]},
        {"images": ["https://example.com/x.jpg", None, b], "texts": [None, "Only text survives before.", None]},
    ]

    def struct(v):  # an Image feature value: bytes, or only a path / URL
        return None if v is None else {"bytes": v, "path": None} if isinstance(v, bytes) else {"bytes": None, "path": v}

    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([[struct(v) for v in r["images"]] for r in rows], pa.list_(img_t))
    table = pa.table({"images": images, "texts": [r["texts"] for r in rows],
                      "metadata": ["{}", "{}"], "general_metadata": ["{}", "{}"]})  # fmt: skip
    pq.write_table(table, tmp_path / "obelics.parquet")
    out = tmp_path / "out"
    man = build(cfg(out, [f"obelics:{tmp_path / 'obelics.parquet'}"], tok_path))
    src = man["sources"][0]
    assert src["dropped_images"]["by_reason"] == {"unsupported_url": 1}
    assert "example.com/x.jpg" in src["dropped_images"]["examples"]["unsupported_url"][0]["error"]
    want = [
        ref_doc([("t", "Intro.", True), ("i", a), ("t", "Middle.", True), ("t", "More.", True),
                 ("i", str(tmp_path / "local.png"))], tok),
        ref_doc([("t", "Only text survives before.", True), ("i", b)], tok),
    ]  # fmt: skip
    assert_docs(out, tok, want)


def test_mmc4_jsonl_placement(tok_path, tok, tmp_path):
    """MMC4-shaped JSONL: images (files under image-root, one URL-only) placed before (default) or after their
    matched sentence; several images at one sentence keep their order."""
    (tmp_path / "imgs").mkdir()
    for n in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "imgs" / n).write_bytes(encoded(noise(40, 60), "JPEG"))
    doc = {"text_list": ["First sentence.", "Second one.", "Third."],
           "image_info": [{"image_name": "b.jpg", "matched_text_index": 2, "raw_url": "http://b", "matched_sim": 0.3},
                          {"image_name": "a.jpg", "matched_text_index": 0, "raw_url": "http://a", "matched_sim": 0.3},
                          {"image_name": "gone.jpg", "matched_text_index": 1, "raw_url": "http://gone"},
                          {"image_name": "c.jpg", "matched_text_index": 2, "raw_url": "http://c"}],
           "url": "http://doc"}  # fmt: skip
    (tmp_path / "docs_shard_0_v2.jsonl").write_text(json.dumps(doc) + "\n")
    im = {n: ("i", str(tmp_path / "imgs" / n)) for n in ("a.jpg", "b.jpg", "c.jpg")}
    t = [("t", s, True) for s in doc["text_list"]]
    for placement, parts in (("before", [im["a.jpg"], t[0], t[1], im["b.jpg"], im["c.jpg"], t[2]]),
                             ("after", [t[0], im["a.jpg"], t[1], t[2], im["b.jpg"], im["c.jpg"]])):  # fmt: skip
        out = tmp_path / placement
        spec = f"mmc4:{tmp_path / 'docs_shard_0_v2.jsonl'},image-root={tmp_path / 'imgs'},placement={placement}"
        man = build(cfg(out, [spec], tok_path))
        assert man["sources"][0]["dropped_images"]["by_reason"] == {"unsupported_url": 1}
        assert_docs(out, tok, [ref_doc(parts, tok)])


# --- imagefolder class names ------------------------------------------------------------------------------------


def test_imagefolder_torchvision_class_index_and_bad_mapping_files(tok_path, tok, tmp_path, cli):
    for syn in ("n01440764", "n01443537"):
        (tmp_path / "train" / syn).mkdir(parents=True)
        (tmp_path / "train" / syn / "x.JPEG").write_bytes(encoded(noise(40, 50), "JPEG"))
    (tmp_path / "imagenet_class_index.json").write_text(
        json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]})
    )
    out = tmp_path / "out"
    build(
        cfg(out, [f"imagefolder:{tmp_path / 'train'},class-names={tmp_path / 'imagenet_class_index.json'}"], tok_path)
    )
    want = [ref_doc([("i", str(tmp_path / "train" / s / "x.JPEG")), ("t", n, True)], tok)
            for s, n in (("n01440764", "tench"), ("n01443537", "goldfish"))]  # fmt: skip
    assert_docs(out, tok, want)
    (tmp_path / "weird.json").write_text(json.dumps({"0": {"wnid": "n01440764"}}))
    r = cli("build", "--source", f"imagefolder:{tmp_path / 'train'}", "--class-names", str(tmp_path / "weird.json"),
                "--tokenizer", str(tok_path), "--out", str(tmp_path / "o2"), "--quiet")  # fmt: skip
    assert r.returncode == 2 and "weird.json: unknown class names shape" in r.stderr
    (tmp_path / "partial.txt").write_text("n01440764 tench\n")
    with pytest.raises(SourceError, match="partial.txt: no name for 1 of the 2 class directories"):
        build(
            cfg(tmp_path / "o3", [f"imagefolder:{tmp_path / 'train'},class-names={tmp_path / 'partial.txt'}"], tok_path)
        )


# --- no silent builds -------------------------------------------------------------------------------------------


def test_wrong_kind_zero_documents_fails_with_reasons(tok_path, tmp_path, cli):
    """LLaVA JSON given as chat: 0 documents -> exit 1, the reasons and the kind to use on stderr."""
    path, root, _ = llava_pretrain(tmp_path, n=3)
    jsonl = tmp_path / "pretrain.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in json.loads(path.read_text())))
    r = cli("build", "--source", f"chat:{jsonl}", "--tokenizer", str(tok_path), "--out", str(tmp_path / "o"),
                "--quiet")  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "0 documents from 3 records" in r.stderr and "use --source llava:" in r.stderr
    assert "bad_record 3" in r.stdout and "manifest.json" in r.stdout  # the summary: reasons per source + where
    (tmp_path / "compact.json").write_text(json.dumps(json.loads(path.read_text())))  # the array on one line
    r = cli("build", "--source", f"chat:{tmp_path / 'compact.json'}", "--tokenizer", str(tok_path), "--out",
            str(tmp_path / "o2"), "--quiet")  # fmt: skip
    assert r.returncode == 1 and "0 documents from 1 records" in r.stderr and "use --source llava:" in r.stderr


def test_image_parquet_as_chat_and_obelics_as_parquet_fail(tok_path, tmp_path, cli):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [PILImage.fromarray(noise(40, 40))] * 3, "text": ["a", "b", "c"]}, features=feats
    )
    ds.to_parquet(str(tmp_path / "d.parquet"))
    r = cli("build", "--source", f"chat:{tmp_path / 'd.parquet'}", "--tokenizer", str(tok_path), "--out",
                str(tmp_path / "o"), "--quiet")  # fmt: skip
    assert r.returncode == 1 and "0 documents from" in r.stderr, r.stderr
    pq.write_table(pa.table({"images": [["http://x"]], "texts": [["t"]]}), tmp_path / "obelics.parquet")
    r = cli("build", "--source", f"parquet:{tmp_path / 'obelics.parquet'}", "--tokenizer", str(tok_path), "--out",
                str(tmp_path / "o2"), "--quiet")  # fmt: skip
    assert r.returncode == 2 and "--source obelics:" in r.stderr


def test_seq_length_too_small_for_images_says_what_is_needed(tok_path, tmp_path, cli):
    (tmp_path / "photo.jpg").write_bytes(encoded(noise(300, 400), "JPEG"))  # 320x416 -> 10x13 patches
    rec = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "photo.jpg"}},
                                                     {"type": "text", "text": "A photo."}]}]}  # fmt: skip
    (tmp_path / "c.jsonl").write_text(json.dumps(rec) + "\n")
    r = cli("build", "--source", f"chat:{tmp_path / 'c.jsonl'}", "--tokenizer", str(tok_path), "--out",
                str(tmp_path / "o"), "--seq-length", "64", "--quiet")  # fmt: skip
    need = 10 * 13 + 10 - 1 + 2 + 2
    assert r.returncode == 1 and "images_exceed_pack" in r.stderr and f"needs --seq-length >= {need}" in r.stderr


def test_max_skip_fraction_fails_then_accepts_on_rerun(tok_path, tmp_path, cli):
    lines = [json.dumps({"text": f"line number {i}"}) for i in range(9)] + ["not json"]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    args = ["build", "--source", f"text:{tmp_path / 't.jsonl'}", "--tokenizer", str(tok_path), "--out",
            str(tmp_path / "o"), "--seq-length", str(S), "--workers", "0", "--quiet"]  # fmt: skip
    r = cli(*args)
    assert r.returncode == 1 and "skipped 1 of 10 records (10.0%) > --max-skip-fraction 0.05" in r.stderr
    assert f"{tmp_path / 't.jsonl'}:10" in r.stdout  # the summary's example: file:line and the reason
    assert (tmp_path / "o" / "manifest.json").exists()
    r = cli(*args, "--max-skip-fraction", "0.2")
    assert r.returncode == 0 and "already complete" in r.stderr


def test_fail_fast_when_a_source_yields_nothing(tok_path, tmp_path):
    recs = [{"id": str(i), "image": f"missing/{i}.jpg", "conversations": [{"from": "human", "value": "<image>"},
            {"from": "gpt", "value": "x"}]} for i in range(30)]  # fmt: skip
    (tmp_path / "l.json").write_text(json.dumps(recs))
    with pytest.raises(BuildError, match="first 10 records were all skipped, stopping: missing_file 10"):
        build(cfg(tmp_path / "o", [f"llava:{tmp_path / 'l.json'},loss-on=text"], tok_path, fail_fast_records=10))


def test_bad_inputs_skip_and_count_in_every_new_kind(tok_path, tmp_path):
    """Per kind, records of each bad-input kind among good ones: exact counts; interleaved kinds drop images."""
    good, bad = encoded(noise(40, 40)), b"not an image"
    bomb = tmp_path / "bomb.png"
    PILImage.new("1", (12000, 12000)).save(bomb)
    (tmp_path / "ok.png").write_bytes(good)
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    llava = [
        json.dumps({"image": "ok.png", "conversations": conv}),
        json.dumps({"image": "nope.png", "conversations": conv}),  # missing_file
        json.dumps({"image": "bomb.png", "conversations": conv}),  # decompression_bomb
        json.dumps({"image": "http://x/y.jpg", "conversations": conv}),  # unsupported_url
        json.dumps({"image": ["ok.png", "ok.png"], "conversations": conv}),  # bad_record: 1 placeholder, 2 images
        json.dumps({"conversations": [{"from": "robot", "value": "?"}]}),  # bad_record: unknown role
        '{"image": "ok.png", "conversations": [',  # bad_json
    ]
    (tmp_path / "l.jsonl").write_text("\n".join(llava) + "\n")
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": b, "path": None} for b in (good, bad, good)], img_t),
                             "caption": ["fine", "corrupt", "   "]}), tmp_path / "p.parquet")  # fmt: skip
    with tarfile.open(tmp_path / "w.tar", "w") as tar:
        for name, data in (("a.jpg", good), ("a.txt", b"ok"), ("b.jpg", bad), ("b.txt", b"x"), ("c.png", good),
                           ("d.txt", b"no image"), ("e.png", good), ("e.txt", b"\xff\xfe")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ob = [{"images": [None, "ok.png", "nope.png", None], "texts": ["t", None, None, "u"]},
          {"images": [None], "texts": ["x", "y"]},
          {"images": [str(bomb)], "texts": [None]}]  # fmt: skip
    (tmp_path / "o.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ob))
    mm = [
        {"text_list": ["a"], "image_info": [{"image_name": "ok.png", "matched_text_index": 0}]},
        {"text_list": ["a"], "image_info": [{"image_name": "ok.png", "matched_text_index": 5}]},  # bad_record
        {"text_list": ["b"], "image_info": [{"image_base64": "@@", "matched_text_index": 0}]},
    ]  # dropped bad_base64
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mm))
    for cls, name, data in (("a", "good.png", good), ("a", "bad.png", bad), ("b", "good.jpg", good)):
        (tmp_path / "folder" / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / cls / name).write_bytes(data)
    specs = [f"llava:{tmp_path / 'l.jsonl'},loss-on=text", f"parquet:{tmp_path / 'p.parquet'}",
             f"wds:{tmp_path / 'w.tar'}", f"obelics:{tmp_path / 'o.jsonl'}", f"mmc4:{tmp_path / 'm.jsonl'}",
             f"imagefolder:{tmp_path / 'folder'}"]  # fmt: skip
    man = build(cfg(tmp_path / "out", specs, tok_path, max_skip_fraction=1.0))
    got = [(s["skipped"]["by_reason"], s["dropped_images"]["by_reason"], s["counts"]) for s in man["sources"]]
    assert got == [
        ({"bad_json": 1, "bad_record": 2, "decompression_bomb": 1, "missing_file": 1, "unsupported_url": 1}, {},
         {"records": 7, "documents": 1}),
        ({"corrupt_image": 1, "empty_text": 1}, {}, {"records": 3, "documents": 1}),
        ({"bad_record": 2, "corrupt_image": 1, "invalid_utf8": 1}, {}, {"records": 5, "documents": 1}),
        ({"bad_record": 1, "empty_text": 1}, {"missing_file": 1}, {"records": 3, "documents": 1}),
        ({"bad_record": 1}, {"bad_base64": 1}, {"records": 3, "documents": 2}),
        ({"corrupt_image": 1}, {}, {"records": 3, "documents": 2}),
    ]  # fmt: skip
    assert man["skipped"]["dropped_images"] == 2
    ob_ex = man["sources"][3]["skipped"]["examples"]["empty_text"][0]  # all of its images dropped: says which
    assert ob_ex["id"] == f"{tmp_path / 'o.jsonl'}:3" and "dropped, e.g. decompression_bomb" in ob_ex["error"]


# --- CLI spec syntax, readers by range --------------------------------------------------------------------------


def test_spec_options_and_grouping(tmp_path):
    (tmp_path / "a=b.jsonl").write_text("{}\n")  # a path that looks like an option but exists is a path
    assert parse_spec(f"llava:{tmp_path / 'a=b.jsonl'},template=mistral,loss_on=last") == (
        "llava", [str(tmp_path / "a=b.jsonl")], {"template": "mistral", "loss-on": "last"})  # fmt: skip
    with pytest.raises(SourceError, match="'loss' is not an option of llava sources"):
        parse_spec("llava:x.json,loss=assistant")
    with pytest.raises(SourceError, match="'template' is not an option of text sources"):
        parse_spec("text:x.jsonl,template=mistral")
    with pytest.raises(SourceError, match="loss-on=everything"):
        parse_spec("chat:x.jsonl,loss-on=everything")
    assert group_words(["wds:a.tar,loss-on=last", "wds:b.tar,loss-on=last", "text:c.jsonl"]) == [
        "wds:a.tar,b.tar,loss-on=last", "text:c.jsonl"]  # fmt: skip
    assert sfiles.expand_braces("/d/{00008..00011}.tar") == [f"/d/{i:05d}.tar" for i in range(8, 12)]
    assert sfiles.expand_braces("x{a,b{1..2}}y") == ["xay", "xb1y", "xb2y"]
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    src = make_sources([f"chat:{tmp_path / 't.jsonl'}"], {"template": "mistral", "image-root": "/imgs"})[0]
    assert (src.template, src.loss_on, src.opts["image-root"]) == ("mistral", "text", "/imgs")
    assert make_sources([f"text:{tmp_path / 't.jsonl'}"], {"template": "mistral"})[0].opts == {}


def test_conversation_shapes_place_images():
    """LLaVA from/value and HF role/content turns (read by format.messages, as generate reads them); images without
    placeholders go to the first USER turn (a system turn first would break the mistral template); placeholder /
    image count mismatches are bad records."""
    from megatron_solo.preprocess.sources.base import Skip
    from megatron_solo.preprocess.sources.conversation import turns

    llava = [{"from": "system", "value": "Be nice."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    assert turns(llava, ["I"]) == [Turn.of("system", "Be nice."), Turn.of("user", Image("I"), "Hi"),
                                                 Turn.of("assistant", "Yo")]  # fmt: skip
    hf = [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"}, {"type": "image"}]},
          {"role": "assistant", "content": "B"}]  # fmt: skip
    assert turns(hf, ["x", "y"]) == [
        Turn.of("user", "A", Image("x"), Image("y")),
        Turn.of("assistant", "B"),
    ]
    for msgs, images in (([{"from": "human", "value": "<image> <image>"}], ["x"]), (hf, ["x"]), (hf, ["x", "y", "z"])):
        with pytest.raises(Skip) as e:
            turns(msgs, images)
        assert e.value.reason == "bad_record"


def test_jsonl_byte_ranges_partition_lines_exactly(tmp_path):
    lines = [json.dumps({"text": "x" * (i % 17), "i": i}) for i in range(200)]
    p = tmp_path / "big.jsonl"
    p.write_text("\n".join(lines[:50]) + "\n\n" + "\n".join(lines[50:]) + "\n")  # a blank line inside
    src = make_sources([f"text:{p}"])[0]
    whole = list(src.read(src.extents(str(p))[0]))
    size = p.stat().st_size
    for target in (1, 97, 1000, size // 3, size):
        ext = src.extents(str(p), target_bytes=target)
        parts = [r for e in ext for r in src.read(e)]
        assert parts == whole, target
    assert len(whole) == 200 and whole[50].record_id == f"{p}:52"  # line numbers count the blank line


def test_json_array_streaming_reader(tmp_path, monkeypatch):
    """Tricky elements (brackets and escaped quotes in strings, nesting, non-ASCII, a scalar), tiny read chunks (every
    element crosses buffer boundaries), a malformed element skipped as one record, a truncated tail."""
    monkeypatch.setattr(sfiles, "READ_CHUNK", 7)
    elems = [{"a": 'x]}[{"y'}, {"b": [1, [2, {"c": "\\\\"}]]}, "plain string", 3.5, {"d": 'é ✓ \\" ]'}]
    text = "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in elems) + "\n]\n"
    p = tmp_path / "a.json"
    p.write_bytes(text.encode())
    got = list(sfiles.read_json_array(str(p)))
    assert [json.loads(b) for _, _, b in got] == elems
    assert [line for _, line, _ in got] == [2, 3, 4, 5, 6]
    # Start at an element's offset (what a partitioned read of a scanned array does), stop before another.
    offs = [o for o, _, _ in got]
    assert [json.loads(b) for _, _, b in sfiles.read_json_array(str(p), offs[1], offs[3])] == elems[1:3]
    p.write_bytes(b'[{"ok": 1}, {"bad": tru}, {"ok": 2}, {"cut": "x')
    got = [b for _, _, b in sfiles.read_json_array(str(p))]
    assert got == [b'{"ok": 1}', b'{"bad": tru}', b'{"ok": 2}', b'{"cut": "x']


def test_table_extents_row_groups_and_batches(tmp_path, tok_path):
    """Parquet row groups and arrow record batches: any cut gives the whole file's records, in order, same ids."""
    table = pa.table({"text": [f"row {i}" for i in range(50)]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    with pa.ipc.new_stream(str(tmp_path / "t.arrow"), table.schema) as w:  # the stream format datasets writes
        for batch in table.to_batches(max_chunksize=7):
            w.write_batch(batch)
    for name in ("t.parquet", "t.arrow"):
        path = str(tmp_path / name)
        src = make_sources([f"parquet:{path}" if name.endswith("parquet") else f"arrow:{path}"])[0]
        whole = [(r.record_id, r.data) for r in src.read(src.extents(path)[0])]
        assert [rid for rid, _ in whole] == [f"{path}[{i}]" for i in range(50)]
        for target in (1, 300, 10**9):
            ext = src.extents(path, target_bytes=target)
            assert ext[-1].stop is None and (len(ext) == 8 if target == 1 else True)
            assert [(r.record_id, r.data) for e in ext for r in src.read(e)] == whole


def test_build_key_follows_source_options(tok_path, tmp_path):
    """Options change the output, so a different one is a different build (refused in the same --out)."""
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    build(cfg(tmp_path / "o", [f"chat:{tmp_path / 't.jsonl'}"], tok_path))
    with pytest.raises(BuildError, match="different shard set"):
        build(cfg(tmp_path / "o", [f"chat:{tmp_path / 't.jsonl'},template=mistral"], tok_path))
