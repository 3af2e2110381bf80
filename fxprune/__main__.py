"""``python -m fxprune`` runs the command line (same as the ``fxprune`` script)."""
import sys

from .cli import main

sys.exit(main())
