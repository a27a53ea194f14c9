"""``python -m bise`` is the ``bise`` command line (torchrun launches it this way)."""

import sys

from .cli import main

sys.exit(main())
