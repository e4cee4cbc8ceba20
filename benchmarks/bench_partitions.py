"""Partitioned builds vs one build on the same cores (issue #14), ratios from one run (see benchmarks/README.md).

Every configuration is a fresh ``python -m tools.preprocess build`` process over the same photos (the 512-px class
of bench_builder.py: crops / flips / rescales of matplotlib's grace_hopper.jpg as JPEG, one ``chat`` record each),
timed from spawn to exit (wall) and by CPU seconds (the process and everything it reaped: partitions and their
decode workers). Configurations run interleaved, best of ``--repeats``:

- ``1x1``: one build, ``--workers 1`` (the single-worker build rate, the baseline);
- ``1xC``: one build, ``--workers C`` (C = ``--cores``);
- ``Cx1``: ``--partitions C --local-partitions C --workers 1``: C packers, one decode worker each;
- ``Cx0``: the same with ``--workers 0`` (each partition decodes in its own process).

Each is run on all ``--images`` photos and on the first quarter of them: the **build rate** is the marginal one,
(images - quarter) / (wall - wall of the quarter), so the fixed cost of starting the processes (an interpreter
and its imports each: ~2 CPU-s, mostly torch from megatron_solo's package import) cancels out; the end-to-end rate
is shown beside it. The target: the best partitioned build rate >= 0.9 x cores x the ``1x1`` build rate.

    PYTHONPATH=. python benchmarks/bench_partitions.py [--images 600] [--cores 2] [--repeats 2]

On a larger node, ``--layouts`` names the configurations (``MxW``: M partitions of W workers each; ``1xW`` is one
plain build), e.g. 1 / 2 / 4 / 8 partitions on 16 cores (``1x1`` is always run, as the baseline):

    PYTHONPATH=. python benchmarks/bench_partitions.py --cores 16 --images 4000 --layouts 1x15 2x7 4x3 8x1
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_builder import make_photos, write_chat

from megatron_solo.format.tokens import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(source: str, tok: Path, out: Path, args: list[str], seq: int) -> tuple[float, float]:
    """(wall s, CPU s) of one CLI build."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tools.preprocess", "build", "--source", source, "--tokenizer", str(tok),
           "--out", str(out), "--seq-length", str(seq), "--shard-size-packs", "16", "--quiet", *args]  # fmt: skip
    c0, t0 = _cpu_children(), time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return wall, cpu


def marginal(images: int, seconds: float) -> float:
    """Images per second of the difference; NaN where load made the larger run no slower (rerun with more
    ``--images`` or ``--repeats``)."""
    return images / seconds if seconds > 0 else float("nan")


def layout_flags(name: str) -> list[str]:
    """``MxW`` -> build flags: M partitions at once with W workers each (``1xW``: one plain build)."""
    m, w = (int(v) for v in name.split("x"))
    if m == 1:
        return ["--workers", str(w)]
    return ["--partitions", str(m), "--local-partitions", str(m), "--workers", str(w)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--cores", type=int, default=2, help="C: workers of the one build, partitions of the others")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq-length", type=int, default=32768)
    ap.add_argument("--out-root", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--layouts", nargs="+", metavar="MxW", help="M partitions x W workers each (default: 1xC Cx1 Cx0)")
    args = ap.parse_args()
    c, n = args.cores, args.images
    small = n // 4
    work = Path(tempfile.mkdtemp(prefix="bench_partitions_"))
    out = Path(tempfile.mkdtemp(prefix="bench_partitions_out_", dir=args.out_root))
    try:
        photos = make_photos(work / "photos", n, (400, 640), seed=0)
        sources = {n: write_chat(photos, work / "all.jsonl"), small: write_chat(photos[:small], work / "quarter.jsonl")}
        tok = train_sentencepiece([ROOT / "megatron_solo" / "demo_data" / "corpus.txt"], work / "tok.model", 1000,
                                  extend=True)  # fmt: skip
        layouts = ["1x1", *(args.layouts or [f"1x{c}", f"{c}x1", f"{c}x0"])]
        configs = {name: layout_flags(name) for name in dict.fromkeys(layouts)}
        best: dict[tuple[str, int], tuple[float, float]] = {}
        for rep in range(args.repeats):
            for name, flags in configs.items():
                for size, source in sources.items():
                    wall, cpu = run(source, tok, out / name, flags, args.seq_length)
                    print(f"  repeat {rep + 1} {name} {size} photos: {wall:.2f} s wall, {cpu:.2f} CPU-s", flush=True)
                    if (name, size) not in best or wall < best[name, size][0]:
                        best[name, size] = (wall, cpu)
        load = os.getloadavg()
        rate = {name: marginal(n - small, best[name, n][0] - best[name, small][0]) for name in configs}
        cpu_rate = {name: marginal(n - small, best[name, n][1] - best[name, small][1]) for name in configs}
        print(f"\n{n} photos (and {small}), seq {args.seq_length}, best of {args.repeats}; load average "
              f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
        print(f"{'config':>6} {'build img/s':>11} {'img/CPU-s':>9} {'end-to-end img/s':>16} {'/ (C x 1x1)':>11}")
        for name in configs:
            e2e = n / best[name, n][0]
            print(
                f"{name:>6} {rate[name]:11.0f} {cpu_rate[name]:9.0f} {e2e:16.0f} {rate[name] / (c * rate['1x1']):11.3f}"
            )
        parted = [name for name in configs if not name.startswith("1x")]
        plain = max((name for name in configs if name != "1x1" and name.startswith("1x")), default=None,
                    key=lambda name: rate[name])  # fmt: skip
        if parted:
            best_part = max(parted, key=lambda name: rate[name])
            part = rate[best_part]
            print(f"\nbest partitioned ({best_part}) build rate / (cores x single-worker rate) = "
                  f"{part / (c * rate['1x1']):.3f} (target >= 0.9)")  # fmt: skip
            if plain:
                print(f"best partitioned / best one build ({plain}) = {part / rate[plain]:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
