"""``python -m training train|export ...``: the same CLI as ``rnnserve train|export``."""

import sys

from training.cli import main

raise SystemExit(main(sys.argv[1:]))
