"""tools.preprocess: raw corpora -> SOLO shard sets (``python -m tools.preprocess build|validate|inspect|demo``).

See docs/preprocess.md. Python API: :func:`tools.preprocess.build.build` (with ``BuildConfig``),
:func:`tools.preprocess.validate.validate`, :func:`tools.preprocess.inspect_pack.render_pack`,
:func:`tools.preprocess.demo.build_demo_shards`.
"""
