"""megatron-solo: pre-train SOLO-style vision-language models (one transformer, raw 32x32 patches) on Megatron-Core."""

from megatron_solo import platform as _platform

_platform.install_import_shims()  # before anything imports megatron.core (no-op when triton is installed)

__version__ = "0.1.0"
