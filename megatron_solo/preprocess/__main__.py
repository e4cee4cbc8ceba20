"""``python -m megatron_solo.preprocess ...``: the same CLI as ``python -m tools.preprocess``."""

import sys

from megatron_solo.preprocess.cli import main

sys.exit(main())
