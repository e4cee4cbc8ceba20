"""``inspect DIR --pack I --out pack.png``: draw one pack the way the model sees it.

Top: every token of the pack as a cell, coloured by kind (text, BOS/EOS, vision special, patch, pad), with document
boundaries as black bars. Below: the documents in order, text decoded and each image rebuilt from its patches
(``unpatchify``), i.e. exactly the pixels stored in the shard.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megatron_solo.data.shards import ShardSet
from megatron_solo.format.layout import unpatchify

KIND_COLOURS = {
    "text": (70, 130, 220),
    "bos/eos": (40, 170, 80),
    "vision special": (245, 150, 30),
    "patch": (215, 45, 45),
    "pad": (205, 205, 205),
}
WIDTH = 1280
CELL = 8
MAX_DOCS = 40
MAX_IMAGE_SIDE = 384


def _token_kinds(tokens: np.ndarray, n_real: int, ids) -> np.ndarray:
    kinds = np.zeros(len(tokens), dtype=np.int8)  # 0 text
    kinds[(tokens == ids.bos) | (tokens == ids.eos)] = 1
    kinds[np.isin(tokens, [ids.vision, ids.row_sep, ids.vision_end])] = 2
    kinds[tokens == ids.vpatch] = 3
    kinds[n_real:] = 4
    return kinds


def _segments(tokens: np.ndarray, patches: np.ndarray, ids, p0: int) -> tuple[list, int]:
    """[("text", ids) | ("image", uint8[H, W, 3])] of one document; returns them and the next patch row."""
    segs, run, i = [], [], 0
    while i < len(tokens):
        t = int(tokens[i])
        if t == ids.vision:
            if run:
                segs.append(("text", run))
                run = []
            j = i + 1
            while j < len(tokens) and tokens[j] != ids.vision_end:
                j += 1
            body = tokens[i + 1 : j]
            n = int((body == ids.vpatch).sum())
            n_h = int((body == ids.row_sep).sum()) + 1
            n_w = n // n_h if n_h else 0
            if n and n_h * n_w == n:
                segs.append(("image", unpatchify(np.ascontiguousarray(patches[p0 : p0 + n]), n_h, n_w)))
            p0 += n
            i = j + 1
        else:
            if t not in (ids.bos, ids.eos):
                run.append(t)
            i += 1
    if run:
        segs.append(("text", run))
    return segs, p0


def render_pack(directory: str | os.PathLike, pack: int, out: str | os.PathLike, tokenizer: str | None = None) -> str:
    """Write the PNG; returns a one-line description."""
    ss = ShardSet(directory)
    p = ss[pack]
    ids = ss.shards[ss.locate(pack)[0]].ids
    tok = None
    tok_path = tokenizer or (ss.manifest or {}).get("tokenizer", {}).get("path")
    if tok_path and Path(tok_path).exists():
        from megatron_solo.format.tokens import SoloTokenizer

        tok = SoloTokenizer(tok_path)
    font = ImageFont.load_default()
    tokens, cu = np.asarray(p.tokens), np.asarray(p.cu_seqlens)
    n_real = int(cu[-1])
    kinds = _token_kinds(tokens, n_real, ids)
    per_row = (WIDTH - 20) // CELL
    strip_h = ((len(tokens) + per_row - 1) // per_row) * CELL

    blocks = []  # (kind, payload, height)
    p0 = 0
    for d in range(len(cu) - 1):
        segs, p0 = _segments(tokens[cu[d] : cu[d + 1]], p.patches, ids, p0)
        if d >= MAX_DOCS:
            continue
        blocks.append(("head", f"document {d}: tokens {cu[d]}:{cu[d + 1]} ({cu[d + 1] - cu[d]})", 16))
        for kind, payload in segs:
            if kind == "text":
                text = tok.decode(payload) if tok else " ".join(map(str, payload))
                lines = textwrap.wrap(text, 200)[:6] or [""]
                blocks.append(("text", lines, 12 * len(lines) + 4))
            else:
                img = Image.fromarray(payload, "RGB")
                scale = min(1.0, MAX_IMAGE_SIDE / max(img.size))
                if scale < 1.0:
                    img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
                blocks.append(("image", (img, payload.shape), img.height + 18))
    if len(cu) - 1 > MAX_DOCS:
        blocks.append(("head", f"... {len(cu) - 1 - MAX_DOCS} more documents", 16))

    legend_h = 20
    height = 40 + legend_h + strip_h + 10 + sum(b[2] for b in blocks) + 10
    canvas = Image.new("RGB", (WIDTH, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    n_img = int((tokens == ids.vision).sum())
    title = (
        f"{Path(directory).name} pack {pack}: {len(tokens)} slots, {n_real} real tokens ({n_real / len(tokens):.1%}),"
        f" {len(cu) - 1} documents, {n_img} images, {len(p.patches)} patches"
    )
    draw.text((10, 10), title, fill=(0, 0, 0), font=font)
    x = 10
    for name, colour in KIND_COLOURS.items():
        draw.rectangle((x, 32, x + 10, 42), fill=colour)
        draw.text((x + 14, 31), name, fill=(0, 0, 0), font=font)
        x += 24 + 7 * len(name)
    y0 = 40 + legend_h
    colours = list(KIND_COLOURS.values())
    for t in range(len(tokens)):
        r, c = divmod(t, per_row)
        x, y = 10 + c * CELL, y0 + r * CELL
        draw.rectangle((x, y, x + CELL - 2, y + CELL - 2), fill=colours[kinds[t]])
    for b in cu[:-1]:
        r, c = divmod(int(b), per_row)
        draw.rectangle((10 + c * CELL - 2, y0 + r * CELL, 10 + c * CELL - 1, y0 + r * CELL + CELL - 1), fill=0)
    y = y0 + strip_h + 10
    for kind, payload, h in blocks:
        if kind == "head":
            draw.text((10, y + 2), payload, fill=(0, 0, 0), font=font)
        elif kind == "text":
            for k, line in enumerate(payload):
                draw.text((24, y + 12 * k), line, fill=KIND_COLOURS["text"], font=font)
        else:
            img, shape = payload
            draw.text(
                (24, y),
                f"image {shape[1]}x{shape[0]} px ({shape[0] // 32}x{shape[1] // 32} patches)",
                fill=KIND_COLOURS["patch"],
                font=font,
            )
            canvas.paste(img, (24, y + 14))
        y += h
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return f"wrote {out}: {title}"
