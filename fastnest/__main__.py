"""``python -m fastnest`` = the ``fastnest`` command."""

import sys

from .train.cli import main

sys.exit(main())
