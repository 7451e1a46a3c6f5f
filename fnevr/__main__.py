"""``python -m fnevr ...``: the same as the ``fnevr`` command."""

import sys

from .cli import main

sys.exit(main())
