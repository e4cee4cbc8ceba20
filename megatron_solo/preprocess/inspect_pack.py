"""``inspect DIR --pack I --out pack.png``: draw one pack the way the model sees it.

Top: every token of the pack as a cell, coloured by kind (text, BOS/EOS, vision special, patch, pad), with document
boundaries as black bars and a dot on every loss target (``Pack.targets``: what the trainer's loss sees). Below: the
documents in order, text decoded (targets in colour, the rest grey) and each image rebuilt from its patches
(``unpatchify``), i.e. exactly the pixels stored in the shard.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megatron_solo.data.shards import ShardSet
from megatron_solo.format.layout import PATCH_SIZE, unpatchify

KIND_COLOURS = {
    "text": (70, 130, 220),
    "bos/eos": (40, 170, 80),
    "vision special": (245, 150, 30),
    "patch": (215, 45, 45),
    "pad": (205, 205, 205),
}
CONTEXT_TEXT = (150, 150, 150)  # decoded text that is not a loss target
WIDTH = 1280
CELL = 8
MAX_DOCS = 40
MAX_IMAGE_SIDE = 384


def _token_kinds(tokens: np.ndarray, n_real: int, ids) -> np.ndarray:
    kinds = np.zeros(len(tokens), dtype=np.int8)  # 0 text
    kinds[(tokens == ids.bos) | (tokens == ids.eos)] = 1
    kinds[np.isin(tokens, ids.layout_ids)] = 2  # <vpatch> (3) overrides below
    kinds[tokens == ids.vpatch] = 3
    kinds[n_real:] = 4
    return kinds


def _segments(tokens: np.ndarray, targets: np.ndarray, patches: np.ndarray, ids, p0: int) -> tuple[list, int]:
    """[("text", (ids, is_target)) | ("image", uint8[H, W, 3])] of one document (a text run ends where the target
    flag changes); returns them and the next patch row."""
    segs, run, i = [], [], 0
    run_target = False
    while i < len(tokens):
        t = int(tokens[i])
        if run and (t == ids.vision or bool(targets[i]) != run_target):
            segs.append(("text", (run, run_target)))
            run = []
        if t == ids.vision:
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
                run_target = bool(targets[i]) if not run else run_target
                run.append(t)
            i += 1
    if run:
        segs.append(("text", (run, run_target)))
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
    targets = np.asarray(p.targets)
    for d in range(len(cu) - 1):
        a, b = cu[d], cu[d + 1]
        segs, p0 = _segments(tokens[a:b], targets[a:b], p.patches, ids, p0)
        if d >= MAX_DOCS:
            continue
        n_t = int(targets[a:b].sum())
        blocks.append(("head", f"document {d}: tokens {a}:{b} ({b - a}, {n_t} targets)", 16))
        for kind, payload in segs:
            if kind == "text":
                run, is_target = payload
                text = tok.decode(run) if tok else " ".join(map(str, run))
                lines = textwrap.wrap(("" if is_target else "[not a target] ") + text, 200)[:6] or [""]
                colour = KIND_COLOURS["text"] if is_target else CONTEXT_TEXT
                blocks.append(("text", (lines, colour), 12 * len(lines) + 4))
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
        f" {len(cu) - 1} documents, {n_img} images, {len(p.patches)} patches, {int(targets.sum())} loss targets"
    )
    draw.text((10, 10), title, fill=(0, 0, 0), font=font)
    x = 10
    for name, colour in KIND_COLOURS.items():
        draw.rectangle((x, 32, x + 10, 42), fill=colour)
        draw.text((x + 14, 31), name, fill=(0, 0, 0), font=font)
        x += 24 + 7 * len(name)
    draw.rectangle((x + 4, 36, x + 5, 37), fill=0)
    draw.text((x + 14, 31), "loss target", fill=(0, 0, 0), font=font)
    y0 = 40 + legend_h
    colours = list(KIND_COLOURS.values())
    for t in range(len(tokens)):
        r, c = divmod(t, per_row)
        x, y = 10 + c * CELL, y0 + r * CELL
        draw.rectangle((x, y, x + CELL - 2, y + CELL - 2), fill=colours[kinds[t]])
        if targets[t]:
            draw.rectangle((x + CELL // 2 - 2, y + CELL // 2 - 2, x + CELL // 2 - 1, y + CELL // 2 - 1), fill=0)
    for b in cu[:-1]:
        r, c = divmod(int(b), per_row)
        draw.rectangle((10 + c * CELL - 2, y0 + r * CELL, 10 + c * CELL - 1, y0 + r * CELL + CELL - 1), fill=0)
    y = y0 + strip_h + 10
    for kind, payload, h in blocks:
        if kind == "head":
            draw.text((10, y + 2), payload, fill=(0, 0, 0), font=font)
        elif kind == "text":
            lines, colour = payload
            for k, line in enumerate(lines):
                draw.text((24, y + 12 * k), line, fill=colour, font=font)
        else:
            img, shape = payload
            draw.text(
                (24, y),
                f"image {shape[1]}x{shape[0]} px ({shape[0] // PATCH_SIZE}x{shape[1] // PATCH_SIZE} patches)",
                fill=KIND_COLOURS["patch"],
                font=font,
            )
            canvas.paste(img, (24, y + 14))
        y += h
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return f"wrote {out}: {title}"
