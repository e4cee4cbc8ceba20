"""Source kinds against each other, same images, same run: images per CPU second (and per wall second) of a whole
``build`` reading the same JPEG photos

- as files named in chat JSONL (``chat``: the baseline; each worker reads its file),
- as ``Image``-feature bytes in a parquet file written by ``datasets`` (``parquet``: the parent reads record batches
  and ships the bytes to the workers),
- (optional) the same through ``save_to_disk`` (``arrow``, memory-mapped) and as ``webdataset.TarWriter`` tars
  (``wds``).

Target: parquet / chat >= 0.9 per CPU second. Builds are interleaved over ``--repeats`` (best of each reported).

    PYTHONPATH=. python benchmarks/bench_sources.py [--images 300] [--workers 2] [--repeats 3]
        [--kinds parquet arrow wds]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.bench_builder import CAPTION, ROOT, Timer, make_photos, write_chat
from megatron_solo.format.tokens import train_sentencepiece
from megatron_solo.preprocess.build import BuildConfig, build


def write_parquet(photos: list[Path], out: Path) -> str:
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in photos], "caption": [CAPTION] * len(photos)}
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(out))
    return f"parquet:{out}"


def write_arrow(photos: list[Path], out: Path) -> str:
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in photos], "caption": [CAPTION] * len(photos)}
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(out))
    return f"arrow:{out}"


def write_wds(photos: list[Path], out: Path, per_shard: int = 100) -> str:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    n_shards = (len(photos) + per_shard - 1) // per_shard
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
            for k, p in enumerate(photos[s * per_shard : (s + 1) * per_shard]):
                w.write({"__key__": f"{s:05d}{k:04d}", "jpg": p.read_bytes(), "txt": CAPTION})
    return f"wds:{out}/{{00000..{n_shards - 1:05d}}}.tar"


def timed_build(source: str, tok: Path, out: Path, workers: int, n: int) -> Timer:
    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(sources=[source], tokenizer=str(tok), out=str(out), seq_length=32768, workers=workers,
                      shard_size_packs=2, quiet=True, chunk_size=8)  # fmt: skip
    with Timer() as t:
        man = build(cfg)
    assert man["counts"]["images"] == n and man["skipped"]["total"] == 0, man["skipped"]
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", nargs="+", default=["parquet", "arrow", "wds"], choices=["parquet", "arrow", "wds"])
    ap.add_argument("--out-root", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_sources_"))
    outs = Path(tempfile.mkdtemp(prefix="bench_sources_out_", dir=args.out_root))
    try:
        tok = train_sentencepiece([ROOT / "megatron_solo" / "demo_data" / "corpus.txt"], tmp / "tok.model", 1000,
                                  extend=True)  # fmt: skip
        photos = make_photos(tmp / "photos", args.images, (480, 560), seed=0)
        sources = {"chat": write_chat(photos, tmp / "photos.jsonl")}
        writers = {"parquet": (write_parquet, "d.parquet"), "arrow": (write_arrow, "d_arrow"), "wds": (write_wds, "w")}
        for k in args.kinds:
            fn, name = writers[k]
            sources[k] = fn(photos, tmp / name)
        mb = sum(p.stat().st_size for p in photos) / 1e6
        print(f"cpu_count={os.cpu_count()} workers={args.workers} repeats={args.repeats}: {len(photos)} JPEG photos "
              f"(long side 480-560 px, {mb:.1f} MB)")  # fmt: skip
        times: dict[str, list[Timer]] = {k: [] for k in sources}
        for _ in range(args.repeats):
            for k, src in sources.items():
                times[k].append(timed_build(src, tok, outs / "out", args.workers, len(photos)))
        n = len(photos)
        rate = {k: (n / min(t.wall for t in ts), n / min(t.cpu for t in ts)) for k, ts in times.items()}
        cw, cc = rate["chat"]
        print(f"[chat] JPEG files via chat JSONL: {cw:.1f} img/s, {cc:.1f} img/CPU-s (baseline)")
        for k in args.kinds:
            w, c = rate[k]
            target = " (target >= 0.90)" if k == "parquet" else ""
            print(f"[{k}] {sources[k].split(':', 1)[0]}: {w:.1f} img/s, {c:.1f} img/CPU-s | / chat {w / cw:.3f} wall, "
                  f"{c / cc:.3f} per CPU-s{target}")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(outs, ignore_errors=True)


if __name__ == "__main__":
    main()
