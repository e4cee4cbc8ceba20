"""Partitioned builds and merged shard sets (issue #14): ``build --partition K/N``, ``merge``, ``build --partitions N``
with ``--local-partitions M``, kill + retry.

The corpus mixes seven source kinds, written by the libraries that write them in the wild where one exists
(pyarrow parquet with small row groups, ``webdataset.TarWriter``), with one large JSON-lines file and one JSON array
that the split must cut by ranges. Every record's text (or, for imagefolder, its class name) carries its id, so the
documents of a build are read back through ``ShardSet`` (megatron-core's ``IndexedDataset``) and matched by record id
against a single build of the same inputs. Ray: tests/test_partition_ray.py.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_solo.data.blend import build_blend
from megatron_solo.data.shards import ShardSet
from megatron_solo.format.tokens import SoloTokenizer, train_sentencepiece
from megatron_solo.preprocess.build import KILL_AT_RECORD_ENV, KILL_ONCE_ENV, BuildConfig, build
from megatron_solo.preprocess.cli import main as cli_main
from megatron_solo.preprocess.merge import MergeError, merge
from megatron_solo.preprocess.partition import Partition, iter_plan_records, plan_partition
from megatron_solo.preprocess.sources import iter_records, make_sources
from megatron_solo.preprocess.validate import validate

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "megatron_solo" / "demo_data" / "corpus.txt"
S = 512
RID = re.compile(r"rid (\d+) (\d+)")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return train_sentencepiece([CORPUS], tmp_path_factory.mktemp("tok") / "solo.model", 1000, extend=True)


@pytest.fixture(scope="module")
def tok(tok_path) -> SoloTokenizer:
    return SoloTokenizer(tok_path)


def _png(rng: np.random.Generator, fmt: str = "PNG") -> bytes:
    """A small distinct picture (a coloured box on a coloured ground: compresses well, so the text dominates the
    input bytes and the large JSON-lines file spreads over several partitions)."""
    h, w = int(rng.integers(24, 100)), int(rng.integers(24, 100))
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    img[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, fmt)
    return buf.getvalue()


def write_mixed_corpus(d: Path) -> tuple[list[str], int]:
    """Seven source kinds; returns (--source specs, number of records). Text of record i of source s holds
    ``rid s i``."""
    rng = np.random.default_rng(0)
    lines = [ln for ln in CORPUS.read_text().splitlines() if ln.strip()]
    (d / "img").mkdir(parents=True)
    n = 0

    def text(s: int, i: int) -> str:
        return f"rid {s} {i} {lines[(7 * s + i) % len(lines)][:60]}"

    # 0: one large JSON-lines file (split by byte ranges)
    (d / "big.jsonl").write_text("".join(json.dumps({"text": text(0, i)}) + "\n" for i in range(800)))
    n += 800
    # 1: chat JSONL with image files and data URLs
    recs = []
    for i in range(24):
        (d / "img" / f"c{i}.png").write_bytes(_png(rng))
        content = [{"type": "image_url", "image_url": {"url": f"img/c{i}.png"}}, {"type": "text", "text": text(1, i)}]
        recs.append(json.dumps({"messages": [{"role": "user", "content": content}]}))
    (d / "chat.jsonl").write_text("\n".join(recs) + "\n")
    n += 24
    # 2: a LLaVA JSON array, pretty-printed (split at element offsets)
    arr = []
    for i in range(20):
        (d / "img" / f"l{i}.jpg").write_bytes(_png(rng, "JPEG"))
        conv = [{"from": "human", "value": "<image>\nWrite a brief caption."}, {"from": "gpt", "value": text(2, i)}]
        arr.append({"id": f"l{i}", "image": f"img/l{i}.jpg", "conversations": conv})
    (d / "llava.json").write_text(json.dumps(arr, indent=2))
    n += 20
    # 3: parquet written by pyarrow, 4 rows a row group (split by row groups)
    rows = [{"image": {"bytes": _png(rng), "path": None}, "caption": text(3, i)} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), d / "caps.parquet", row_group_size=4)
    n += 20
    # 4: imagefolder, one class per image so the class name carries the id (split by list positions)
    for i in range(12):
        (d / "folder" / f"rid_4_{i}").mkdir(parents=True)
        (d / "folder" / f"rid_4_{i}" / "x.png").write_bytes(_png(rng))
    n += 12
    # 5: WebDataset tars (whole files)
    wds = pytest.importorskip("webdataset")
    for t in range(2):
        with wds.TarWriter(str(d / f"shard{t}.tar")) as w:
            for j in range(5):
                w.write({"__key__": f"k{t}{j}", "jpg": _png(rng, "JPEG"), "txt": text(5, 5 * t + j)})
    n += 10
    # 6: gzipped JSON lines (whole file)
    with gzip.open(d / "more.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": text(6, i)}) + "\n" for i in range(8)))
    n += 8
    specs = [
        f"text:{d / 'big.jsonl'}",
        f"chat:{d / 'chat.jsonl'}",
        f"llava:{d / 'llava.json'}",
        f"parquet:{d / 'caps.parquet'}",
        f"imagefolder:{d / 'folder'}",
        f"wds:{d / 'shard0.tar'},{d / 'shard1.tar'}",
        f"text:{d / 'more.jsonl.gz'}",
    ]
    return specs, n


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    specs, n = write_mixed_corpus(d)
    return d, specs, n


def cfg_for(out: Path, specs: list[str], tok_path: Path, **kw) -> BuildConfig:
    kw.setdefault("workers", 0)
    return BuildConfig(sources=specs, tokenizer=str(tok_path), out=str(out), seq_length=S, shard_size_packs=2,
                       buffer_docs=64, chunk_size=8, quiet=True, **kw)  # fmt: skip


def documents_by_id(directory: Path, tok: SoloTokenizer) -> dict[tuple[int, int], tuple[tuple, bytes]]:
    """Every document of the shard set at ``directory``, read through ShardSet, keyed by the record id in its text;
    a record id seen twice fails."""
    ss = ShardSet(directory)
    out = {}
    for g in range(len(ss)):
        p = ss[g]
        p0 = 0
        for a, b in zip(p.cu_seqlens[:-1], p.cu_seqlens[1:]):
            t = p.tokens[a:b]
            n = int((t == tok.vpatch_id).sum())
            text = tok.decode([int(x) for x in t if x < tok.vision_id and x not in (tok.bos_id, tok.eos_id)])
            m = RID.search(text.replace("_", " "))
            assert m, f"no record id in a document of {directory}: {text[:80]!r}"
            key = (int(m[1]), int(m[2]))
            assert key not in out, f"record {key} twice in {directory}"
            out[key] = (tuple(t.tolist()), p.patches[p0 : p0 + n].tobytes())
            p0 += n
    return out


@pytest.fixture(scope="module")
def single(corpus, tok_path, tok, tmp_path_factory):
    d, specs, n = corpus
    out = tmp_path_factory.mktemp("single") / "set"
    man = build(cfg_for(out, specs, tok_path))
    docs = documents_by_id(out, tok)
    assert len(docs) == n == man["counts"]["input_records"] == man["counts"]["documents"]
    return out, man, docs


def build_partitions(out: Path, specs, tok_path, count: int) -> list[dict]:
    return [build(cfg_for(out, specs, tok_path, partition=f"{k}/{count}")) for k in range(count)]


def test_plan_gives_every_record_once_in_build_order(corpus):
    d, specs, n = corpus
    sources = make_sources(specs, seed=1234)
    whole = [r.record_id for r in iter_records(sources)]
    assert len(whole) == len(set(whole)) == n
    spread: dict[int, dict[str, set[int]]] = {}  # count -> file -> partitions reading part of it
    for count in [*range(1, 10), 16, 40, 120]:
        plans = [plan_partition(make_sources(specs, seed=1234), Partition(k, count)) for k in range(count)]
        got = [r.record_id for p in plans for r in iter_plan_records(sources, p)]
        assert got == whole, count  # the partitions in order are the single build's record stream
        assert sum(p.nbytes for p in plans) == plans[0].total_bytes
        for p in plans:
            for piece in p.pieces:
                spread.setdefault(count, {}).setdefault(Path(piece.extent.path).name, set()).add(p.part.index)
    # The big JSON-lines file spreads over N = 7; the JSON array, the parquet file and the image folder are cut too
    # (element offsets, row groups, list positions) once partitions are small enough; tars and .gz never are.
    assert len(spread[7]["big.jsonl"]) >= 3
    for name in ("llava.json", "caps.parquet", "folder"):
        assert max(len(by_file[name]) for by_file in spread.values()) >= 2, name
    assert all(len(by_file[name]) == 1 for by_file in spread.values() for name in ("shard0.tar", "more.jsonl.gz"))
    plans = [plan_partition(sources, Partition(k, 7)) for k in range(7)]
    share, tar = plans[0].total_bytes / 7, (d / "shard0.tar").stat().st_size
    assert max(p.nbytes for p in plans) <= share + tar  # balanced by bytes, within a unit (here: a whole tar)
    # (one of the 7 gets nothing here: a 30 KB tar cannot be cut; the N = 7 build below shows an empty partition
    # builds, merges and counts like any other)
    assert plans[3].describe()["extents"] == [x.to_json() for x in plans[3].pieces]


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_merged_partitions_hold_the_single_builds_documents(count, corpus, single, tok_path, tok, tmp_path):
    d, specs, n = corpus
    s_out, s_man, s_docs = single
    out = tmp_path / f"p{count}"
    mans = build_partitions(out, specs, tok_path, count)
    assert sum(m["counts"]["input_records"] for m in mans) == n
    merged = merge(out)
    assert documents_by_id(out, tok) == s_docs  # every record exactly once; tokens and patches equal
    for key in ("documents", "input_records", "images", "patches", "tokens_text", "tokens_vision", "tokens_target"):
        assert merged["counts"][key] == s_man["counts"][key], key
    assert [s["counts"] for s in merged["sources"]] == [s["counts"] for s in s_man["sources"]]
    assert len(merged["merged"]["sets"]) == count and merged["skipped"]["total"] == 0
    problems, report = validate(out)
    assert problems == [] and f"{merged['counts']['packs']} packs" in report


def test_partition_resumes_on_its_own_byte_identical(corpus, tok_path, tmp_path, cli):
    """A partition is its own resumable shard set: SIGKILL it mid-way (CLI), re-run, same bytes as uninterrupted."""
    d, specs, _ = corpus
    ref = tmp_path / "ref"
    build(cfg_for(ref, specs, tok_path, partition="1/3"))
    ref_part = ref / Partition(1, 3).name
    man = json.loads((ref_part / "manifest.json").read_text())
    assert len(man["shards"]) >= 3
    kill_at = man["shards"][1]["records"][0] + 1
    out = tmp_path / "killed"
    args = _cli_build_args(out, specs, tok_path) + ["--partition", "1/3"]
    r = run_cli(args, {KILL_AT_RECORD_ENV: f"1:{kill_at}"})
    assert r.returncode == -9, r.stderr
    r = cli(args)
    assert r.returncode == 0, r.stderr
    assert "kept 1 verified shard" in r.stderr and "merge" in r.stdout
    assert _tree(out / Partition(1, 3).name) == _tree(ref_part)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cli_build_args(out: Path, specs: list[str], tok_path: Path, workers: int = 0) -> list[str]:
    args = ["build", "--tokenizer", str(tok_path), "--out", str(out), "--seq-length", str(S), "--workers", str(workers),
            "--shard-size-packs", "2", "--buffer-docs", "64", "--quiet"]  # fmt: skip
    for s in specs:
        args += ["--source", s]
    return args


class Cli:
    """``main(argv)`` in this process (a fresh interpreter costs seconds): exit code, stdout, stderr."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, args: list[str]) -> subprocess.CompletedProcess:
        self.capsys.readouterr()
        code = cli_main(args)
        out = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture
def cli(capsys) -> Cli:
    return Cli(capsys)


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process (for the runs that SIGKILL themselves)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SOLO_PREPROCESS_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "tools.preprocess", *args], capture_output=True, text=True, cwd=ROOT,
                          env=e, timeout=timeout)  # fmt: skip


def test_local_partitions_retry_a_killed_partition_byte_identical(corpus, tok_path, tmp_path, cli, monkeypatch):
    """``build --partitions 3 --local-partitions 2``: one partition's process is SIGKILLed on its first attempt, the
    launcher starts it again, it resumes; the merged set equals the uninterrupted partitioned build's, byte for
    byte, and validate / inspect / the blend read it."""
    d, specs, n = corpus
    ref = tmp_path / "ref"
    r = cli(_cli_build_args(ref, specs, tok_path) + ["--partitions", "3", "--local-partitions", "2"])
    assert r.returncode == 0, r.stderr
    assert f"from {n:,} records" in r.stdout
    mans = [json.loads((ref / Partition(k, 3).name / "manifest.json").read_text()) for k in range(3)]
    k = max(range(3), key=lambda i: len(mans[i]["shards"]))
    assert len(mans[k]["shards"]) >= 2
    kill_at = mans[k]["shards"][1]["records"][0] + 1  # inside its second shard
    out = tmp_path / "killed"
    monkeypatch.setenv(KILL_AT_RECORD_ENV, f"{k}:{kill_at}")  # (the launcher hands SOLO_PREPROCESS_* on)
    monkeypatch.setenv(KILL_ONCE_ENV, str(tmp_path / "once"))
    r = cli(_cli_build_args(out, specs, tok_path) + ["--partitions", "3", "--local-partitions", "2"])
    assert r.returncode == 0, r.stderr
    assert f"partition {k}/3: process ended by signal 9; retrying" in r.stderr
    assert f"partition {k}/3: resume: kept 1 verified shard(s)" in r.stderr
    assert _tree(out) == _tree(ref)
    r = cli(["validate", str(out)])
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    png = tmp_path / "pack.png"
    ss = ShardSet(out)
    last = len(ss) - 1  # a pack of the last partition
    r = cli(["inspect", str(out), "--pack", str(last), "--out", str(png)])
    assert r.returncode == 0 and png.exists(), r.stderr
    blend = build_blend([str(out)], seed=1)
    assert len(blend) == len(ss) == json.loads((out / "manifest.json").read_text())["counts"]["packs"]
    assert sorted(blend.source_of(g)[1] for g in range(len(blend))) == list(range(len(ss)))


def _sbatch(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """examples/preprocess_slurm.sbatch run by bash with the variables SLURM would set (no SLURM here)."""
    e = os.environ | {"SOLO_PYTHON": sys.executable, "SLURM_CPUS_PER_TASK": "1"} | env
    return subprocess.run(["bash", str(ROOT / "examples" / "preprocess_slurm.sbatch"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=e, timeout=300)  # fmt: skip


def test_slurm_array_tasks_then_merge(corpus, single, tok_path, tok, tmp_path, cli):
    """examples/preprocess_slurm.sbatch as the array tasks run it (any order, --cpus-per-task 1: no decode
    workers), then as the merge job; merging refuses until every partition is there. The submit script's two sbatch
    commands (DRY_RUN) carry the same flags; both scripts pass bash -n and shellcheck (where installed)."""
    d, specs, n = corpus
    out = tmp_path / "slurm"
    build_args = _cli_build_args(out, specs, tok_path)[1:]
    build_args.remove("--workers")
    build_args.remove("0")
    for k in (2, 0):
        r = _sbatch(["build", *build_args], {"SLURM_ARRAY_TASK_ID": str(k), "PARTITIONS": "3"})
        assert r.returncode == 0, r.stderr
        assert f"partition {k}/3 written to {out / Partition(k, 3).name}" in r.stdout
    r = cli(["merge", str(out)])
    assert r.returncode == 2 and "lacks partition(s) 1/3" in r.stderr, r.stderr
    r = _sbatch(["build", *build_args], {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MAX": "2"})  # N from the array
    assert r.returncode == 0, r.stderr
    r = _sbatch(["merge", str(out)], {})
    assert r.returncode == 0, r.stderr
    assert "merged 3 shard set(s)" in r.stdout and f"from {n:,} records" in r.stdout
    assert documents_by_id(out, tok) == single[2]
    submit = ROOT / "examples" / "preprocess_slurm_submit.sh"
    r = subprocess.run(["bash", str(submit), "3", *build_args], capture_output=True, text=True,
                       env=os.environ | {"DRY_RUN": "1"}, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    array_cmd, merge_cmd = r.stdout.strip().splitlines()
    assert "--array=0-2" in array_cmd and "PARTITIONS=3" in array_cmd and "preprocess_slurm.sbatch build" in array_cmd
    assert f"--out {out}" in array_cmd
    assert "--dependency=afterok:JOBID" in merge_cmd and merge_cmd.rstrip().endswith(f"merge {out}")
    scripts = [str(submit), str(ROOT / "examples" / "preprocess_slurm.sbatch")]
    for script in scripts:
        assert subprocess.run(["bash", "-n", script]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_merge_appends_new_data_and_refuses_what_does_not_fit(corpus, tok_path, tok, tmp_path):
    d, specs, _ = corpus
    out = tmp_path / "set"
    build_partitions(out, specs[:3], tok_path, 2)
    first = merge(out)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("shard_*")}
    extra = tmp_path / "extra"  # new data, later: a plain build, appended without rebuilding anything
    build(cfg_for(extra, specs[3:5], tok_path))
    m = merge(out, [extra])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("shard_*")} == stamp
    assert m["counts"]["packs"] == first["counts"]["packs"] + json.loads((extra / "manifest.json").read_text())[
        "counts"]["packs"]  # fmt: skip
    assert len(m["sources"]) == 5 and [s["path"] for s in m["merged"]["sets"]] == [
        "part_0_of_2", "part_1_of_2", "../extra"]  # fmt: skip
    again = merge(out)  # re-merging keeps the appended set
    assert again == m and validate(out)[0] == []
    assert len(ShardSet(out)) == m["counts"]["packs"]
    # A set rebuilt after the merge is caught by validate.
    shutil.copytree(out.parent / "extra", tmp_path / "extra_copy")
    man = json.loads((extra / "manifest.json").read_text())
    (extra / "manifest.json").write_text(json.dumps(man, indent=2))
    assert any("changed since the merge" in p for p in validate(out)[0])
    # Refusals, each naming the set.
    other_seq = tmp_path / "seq256"
    build(BuildConfig(sources=specs[:1], tokenizer=str(tok_path), out=str(other_seq), seq_length=256, workers=0,
                      quiet=True))  # fmt: skip
    with pytest.raises(MergeError, match=f"cannot merge {other_seq}: its seq_length is 256, but .* has 512"):
        merge(tmp_path / "m1", [out, other_seq])
    tok2 = train_sentencepiece([CORPUS], tmp_path / "tok2" / "solo.model", 800, extend=True)
    other_tok = tmp_path / "tok2set"
    build(cfg_for(other_tok, specs[:1], tok2))
    with pytest.raises(MergeError, match=f"cannot merge {other_tok}: its tokenizer sha256"):
        merge(tmp_path / "m2", [extra, other_tok])
    bumped = tmp_path / "bumped"
    shutil.copytree(tmp_path / "extra_copy", bumped)
    man = json.loads((bumped / "manifest.json").read_text()) | {"format_version": 99}
    (bumped / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(MergeError, match=f"cannot merge {bumped}: its manifest format_version is 99"):
        merge(tmp_path / "m3", [tmp_path / "extra_copy", bumped])
    with pytest.raises(MergeError, match="already there as .* twice"):
        merge(tmp_path / "m4", [tmp_path / "extra_copy", extra])
    build(cfg_for(out, specs[:3], tok_path, partition="0/1"))  # the same inputs split another way
    with pytest.raises(MergeError, match="partitioned two ways"):
        merge(tmp_path / "m5", [out, out / "part_0_of_1"], fresh=True)
    with pytest.raises(MergeError, match="holds a built shard set"):
        merge(extra, [out])


def test_partition_spec_errors(corpus, tok_path, tmp_path, cli):
    d, specs, _ = corpus
    r = cli(_cli_build_args(tmp_path / "o", specs[:1], tok_path) + ["--partition", "3/3"])
    assert r.returncode == 2 and "0 <= K < N" in r.stderr
    r = cli(_cli_build_args(tmp_path / "o", specs[:1], tok_path) + ["--partition", "1/2", "--partitions", "2"])
    assert r.returncode == 2 and "--partition K/N builds one partition" in r.stderr
    r = cli(_cli_build_args(tmp_path / "o", specs[:1], tok_path) + ["--ray"])
    assert r.returncode == 2 and "--ray needs --partitions N" in r.stderr


@pytest.mark.dist
def test_demo_trains_from_a_merged_set_of_3_partitions(tmp_path):
    """The demo's train split built as 3 partitions on this machine and merged; validate and inspect read it and
    pretrain_solo.py trains from it (``--data-path`` of the merged directory: one set)."""
    from megatron_solo.preprocess.demo import build_demo_shards
    from megatron_solo.preprocess.inspect_pack import render_pack
    from tests.dist import REPO, torchrun_cmd, torchrun_env

    res = build_demo_shards(tmp_path / "demo", seq_length=256, partitions=3)
    train = Path(res["train"])
    man = res["train_manifest"]
    assert [s["path"] for s in man["merged"]["sets"]] == [Partition(k, 3).name for k in range(3)]
    assert man["skipped"]["total"] == 0 and man["counts"]["images"] > 0
    problems, _ = validate(train)
    assert problems == []
    assert "wrote" in render_pack(train, len(ShardSet(train)) - 1, tmp_path / "last.png", tokenizer=res["tokenizer"])
    metrics = tmp_path / "metrics.jsonl"
    flags = ["--model", "debug", "--data-path", str(train), "--valid-data-path", res["valid"], "--micro-batch-size",
             "1", "--global-batch-size", "2", "--train-iters", "4", "--lr", "3e-3", "--lr-warmup-iters", "1",
             "--eval-interval", "4", "--eval-iters", "1", "--seed", "7", "--metrics-log", str(metrics)]  # fmt: skip
    r = subprocess.run(torchrun_cmd("pretrain_solo.py", 1, flags), cwd=REPO, env=torchrun_env(), capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    losses = [x["loss"] for x in records if x["kind"] == "train"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert f"{len(ShardSet(train))} packs" in r.stdout + r.stderr
