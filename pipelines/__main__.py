"""``python -m poisonguard``: the command line."""

import sys

from poisonguard.cli import main

sys.exit(main())
