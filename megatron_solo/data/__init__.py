"""Shard reading (shards.py); batching and blending live in batch.py / blend.py."""

from megatron_solo.data.shards import Pack, Shard, ShardSet, read_manifest, read_shard_meta

__all__ = ["Pack", "Shard", "ShardSet", "read_manifest", "read_shard_meta"]
