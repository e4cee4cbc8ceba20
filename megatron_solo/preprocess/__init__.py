"""megatron_solo.preprocess: raw corpora -> SOLO shard sets, the only writer of the shard format the data path reads.

CLI: ``python -m tools.preprocess build|validate|inspect|demo`` (a thin entry over :mod:`.cli`; also
``python -m megatron_solo.preprocess`` and the console script ``solo-preprocess``). See docs/preprocess.md. Python
API: :func:`megatron_solo.preprocess.build.build` (with ``BuildConfig``), :func:`.validate.validate`,
:func:`.inspect_pack.render_pack`, :func:`.demo.build_demo_shards`.
"""
