"""``python -m clipped_optim report CHECKPOINT``: see :mod:`clipped_optim.cli`."""

import sys

from .cli import main

sys.exit(main())
