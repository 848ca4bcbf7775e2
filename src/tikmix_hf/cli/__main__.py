"""``python -m tikmix_hf.cli``: the same as the ``tikmix`` command."""

import sys

from . import main

sys.exit(main())
