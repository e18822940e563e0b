"""``python -m biograd ...`` runs the ``biograd`` command."""

import sys

from .cli import main

sys.exit(main())
