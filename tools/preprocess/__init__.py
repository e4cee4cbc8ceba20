"""``python -m tools.preprocess``: the shard-building CLI; the library is :mod:`megatron_solo.preprocess`."""
