"""Command-line tools of megatron-solo (``python -m tools.preprocess``)."""
