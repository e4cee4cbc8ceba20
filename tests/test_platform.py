"""megatron_solo.platform is the one place that redirects CUDA assumptions, and only when CUDA is absent."""

import re
from pathlib import Path

import torch

from megatron_solo import platform

PACKAGE = Path(platform.__file__).parent


def test_redirects_apply_on_cpu_and_are_idempotent():
    assert platform.on_cpu() == (not torch.cuda.is_available())
    first = platform.apply_cpu_redirects()
    second = platform.apply_cpu_redirects()
    assert first == second
    if platform.on_cpu():
        assert any("RNG" in line for line in first)
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2, device="cuda").device.type == "cpu"  # device_mode
        assert torch.zeros(2).type() == "torch.cuda.FloatTensor"  # what clip_grads / dist-opt dispatch on


def test_no_other_module_patches_torch_cuda_or_megatron():
    """A redirect written anywhere else would leak into GPU code paths."""
    assignment = re.compile(r"^\s*(torch\.cuda\.\w+|\w+\._(get|set)_cuda_rng_state)\s*=", re.M)
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "platform.py" and assignment.search(path.read_text())
    ]
    assert offenders == []
