"""``python -m fastnest.train [options]`` = ``fastnest train [options]``."""

import sys

from .cli import main

sys.exit(main(["train", *sys.argv[1:]]))
