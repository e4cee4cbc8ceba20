"""SOLO pre-training entry point: ``torchrun --nproc_per_node N pretrain_solo.py <Megatron-LM style flags>``.

See docs/training.md and examples/ (CPU demo, the SOLO stage 1/2/3 recipes, SLURM, Docker).
"""

import warnings

# Known, harmless third-party notices (no Apex/TE on CPU, deprecated collective names): keep the console readable.
# Set here, before any import, because dist_checkpointing's writer re-imports this module in a spawn child.
for _pattern in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "When using async grad allreduce",
    "full scope is deprecated",
    "The .grad attribute of a Tensor that is not a leaf",
    r"`torch.distributed.\w+` is deprecated",
):
    warnings.filterwarnings("ignore", message=_pattern)

from megatron_solo.training.loop import main  # noqa: E402

if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer re-imports __main__ in a spawn child
    main()
