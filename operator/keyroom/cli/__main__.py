"""``python -m keyroom.cli``: the same as ``kubectl keyroom``."""
import sys

from keyroom.cli.plugin import main

sys.exit(main())
