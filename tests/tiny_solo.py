"""A tiny random SOLO model in both checkpoint formats, built the way users make one: a tiny random HF Mistral
(real transformers code, SentencePiece trained on the shipped corpus) -> ``import_hf --tp 1`` (the CLI, one process)
-> ``export_hf`` (the exported SOLO-HF dir). Plus a few real photos (matplotlib ships them) and a random image."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.dist import DIST_VARS, REPO


def single_process_env(**extra: str) -> dict[str, str]:
    """The environment of a one-process CLI child: the repo importable, no GPU, 1 thread, no inherited rank."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)
    return env


@dataclass
class TinySolo:
    root: Path
    hf_mistral: Path
    solo: Path  # SOLO checkpoint dir
    hf: Path  # exported SOLO-HF dir
    images: list[Path]


def _images(out: Path) -> list[Path]:
    """Two photos shipped inside matplotlib (real JPEG/PNG files), resized small, and one random image."""
    import matplotlib
    from PIL import Image

    data = Path(matplotlib.get_data_path()) / "sample_data"
    paths = []
    for k, name in enumerate(("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")):
        img = Image.open(data / name).convert("RGB")
        img.thumbnail((96, 96) if k == 0 else (64, 48))
        paths.append(out / f"photo{k}.png")
        img.save(paths[-1])
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((70, 100, 3)) * 255).astype(np.uint8)).save(out / "noise.png")
    return [*paths, out / "noise.png"]


def build_tiny_solo(root: Path) -> TinySolo:
    from megatron_solo.convert.export_hf import export_hf
    from tests.workers.convert_roundtrip import make_hf_mistral

    root.mkdir(parents=True, exist_ok=True)
    hf_mistral, solo, hf = root / "hf_mistral", root / "solo", root / "hf_solo"
    make_hf_mistral(hf_mistral)
    env = single_process_env()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_solo.convert.import_hf",
            "--hf-dir",
            str(hf_mistral),
            "--out",
            str(solo),
            "--tp",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    export_hf(solo, hf)
    return TinySolo(root, hf_mistral, solo, hf, _images(root))
