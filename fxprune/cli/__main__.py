"""``python -m fxprune.cli`` runs the command line (same as ``python -m fxprune``)."""
import sys

from .parser import main

sys.exit(main())
