"""The bundled demo corpus: a tiny tokenizer + train/valid shard sets a small SOLO model can learn from on CPU.

Everything is generated deterministically under ``out_dir/raw`` and then built through the real ``build`` path:

- ``shapes/``: an ImageNet-layout image folder of coloured shapes (class dir ``red_circle`` -> target ``red circle``),
- ``captions.jsonl``: chat-style records (the released SOLO format) with generated shape pictures (as file paths)
  whose captions state colour, shape, size and position, and variants of the one real photo that ships with
  matplotlib (grace_hopper.jpg: crops / flips, as base64 data URLs),
- ``text.jsonl``: text-only records from ``megatron_solo/demo_data/corpus.txt``.
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw

from megatron_solo.format.tokens import SoloTokenizer, train_sentencepiece
from megatron_solo.preprocess.build import BuildConfig, build, summary
from megatron_solo.preprocess.launch import available_cpus, build_partitioned, default_workers

CORPUS = Path(__file__).resolve().parents[1] / "demo_data" / "corpus.txt"
VOCAB = 1000
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"grey": (128, 128, 128), "pink": (240, 180, 200), "teal": (40, 140, 140)}
SIZES = {"small": 0.45, "big": 0.85}


def _photo_path() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _shape_image(rng: random.Random, side: int) -> tuple[Image.Image, dict]:
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    bg = rng.choice(sorted(BACKGROUNDS))
    size = rng.choice(sorted(SIZES))
    im = Image.new("RGB", (side, side), BACKGROUNDS[bg])
    d = ImageDraw.Draw(im)
    r = SIZES[size] * side / 2
    cx = cy = side / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLOURS[colour])
    return im, {"colour": colour, "shape": shape, "background": bg, "size": size}


_CAPTIONS = (
    "A {size} {colour} {shape} on a {background} background.",
    "This picture shows a {size} {colour} {shape}. The background is {background}.",
    "We are looking at a {colour} {shape} in front of a {background} wall.",
    "The image shows one {size} {shape}. It is {colour}, and the background is {background}.",
)


def _photo_variants(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(data URL, caption) of crops / flips / scales of the bundled real photo."""
    photo = Image.open(_photo_path()).convert("RGB")
    out = []
    for _ in range(n):
        w, h = photo.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = photo.crop((x, y, x + cw, y + ch))
        flipped = rng.random() < 0.5
        if flipped:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.resize((max(32, cw // 3), max(32, ch // 3)), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        caption = "A portrait photo of Grace Hopper, a woman in a dark navy uniform with medals, in front of a flag."
        if flipped:
            caption += " The photo is mirrored."
        out.append((url, caption))
    return out


def write_demo_corpus(
    raw: Path, split: str, n_shapes: int, n_folder: int, n_photos: int, text_lines: list[str], seed: int
) -> list[str]:
    """Write one split's raw corpus under ``raw/split``; returns the ``--source`` specs for ``build``."""
    rng = random.Random(seed)
    root = raw / split
    shapes_dir, folder = root / "shape_pics", root / "shapes"
    shapes_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_shapes):
        im, a = _shape_image(rng, rng.choice((64, 96)))
        name = f"shape_pics/{i:05d}.png"
        im.save(root / name)
        caption = rng.choice(_CAPTIONS).format(**a)
        content = [{"type": "image_url", "image_url": {"url": name}}, {"type": "text", "text": caption}]
        records.append({"messages": [{"role": "user", "content": content}]})
    for url, caption in _photo_variants(n_photos, rng):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": caption}]
        records.append({"messages": [{"role": "user", "content": content}]})
    rng.shuffle(records)
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for i in range(n_folder):
        im, a = _shape_image(rng, 64)
        d = folder / f"{a['colour']}_{a['shape']}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:05d}.png")
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text_lines))
    return [f"chat:{root / 'captions.jsonl'}", f"imagefolder:{folder}", f"text:{root / 'text.jsonl'}"]


def build_demo_shards(
    out_dir: str | Path, seq_length: int = 1024, quiet: bool = True, workers: int = 2, partitions: int = 1
) -> dict:
    """Build the demo: returns {"train": dir, "valid": dir, "tokenizer": path, "train_manifest", "valid_manifest"}.

    Deterministic (same files for the same library versions). About 250 train / 16 valid packs at seq 1024.
    ``partitions`` > 1: the train split is built as that many partitions on this machine and merged (launch.py).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.model"
    if not tok_path.exists():
        train_sentencepiece([CORPUS], tok_path, VOCAB, extend=True)
    SoloTokenizer(tok_path)  # check it loads
    lines = [ln.strip() for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    n_valid_text = 24
    scale = seq_length / 1024
    splits = {
        # text ~60K tokens + shapes (~35 tokens each) + photos: ~250 packs of 1024 for train.
        "train": dict(
            n_shapes=int(5600 * scale),
            n_folder=int(2200 * scale),
            n_photos=24,
            text_lines=lines[:-n_valid_text] * 1,
            seed=1,
        ),
        "valid": dict(
            n_shapes=int(420 * scale), n_folder=int(140 * scale), n_photos=2, text_lines=lines[-n_valid_text:], seed=2
        ),
    }
    result: dict = {"tokenizer": str(tok_path)}
    for split, kw in splits.items():
        sources = write_demo_corpus(out / "raw", split, **kw)
        cfg = BuildConfig(
            sources=sources,
            tokenizer=str(tok_path),
            out=str(out / split),
            seq_length=seq_length,
            workers=workers,
            shard_size_packs=128,
            seed=kw["seed"],
            buffer_docs=1024,
            quiet=quiet,
        )
        if split == "train" and partitions > 1:
            at_once = min(partitions, available_cpus())
            man = build_partitioned(replace(cfg, workers=default_workers(at_once)), partitions, at_once)
        else:
            man = build(cfg)
        result[split] = str(out / split)
        result[f"{split}_manifest"] = man
    return result


def run_demo(out: str, seq_length: int = 1024, quiet: bool = False, workers: int = 2, partitions: int = 1) -> int:
    """The ``demo`` sub-command: build, then print a short summary per split."""
    res = build_demo_shards(out, seq_length, quiet=quiet, workers=workers, partitions=partitions)
    for split in ("train", "valid"):
        print(f"[demo] {split}: {res[split]}")
        print("\n".join("  " + ln for ln in summary(res[f"{split}_manifest"]).splitlines()))
    print(f"[demo] tokenizer: {res['tokenizer']}")
    return 0
