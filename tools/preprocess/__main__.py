"""``python -m tools.preprocess {build,merge,validate,inspect,demo}``: thin entry over megatron_solo.preprocess.cli."""

import sys

from megatron_solo.preprocess.cli import main

if __name__ == "__main__":
    sys.exit(main())
