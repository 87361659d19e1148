"""`python -m dist_seg.bench data | train` (the same as `dist-seg bench ...`)."""

import sys

from dist_seg.bench import main

sys.exit(main(["bench", *sys.argv[1:]]))
