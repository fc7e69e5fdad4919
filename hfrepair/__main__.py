"""``python -m hfrepair`` runs the command line, like the ``hfrepair`` script."""

import sys

from .cli import main

sys.exit(main())
