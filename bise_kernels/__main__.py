"""``python -m bise_kernels [--json]``: the diagnostics to paste into a bug report (:mod:`.info`)."""

from .info import main

raise SystemExit(main())
