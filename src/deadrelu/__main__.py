"""``python -m deadrelu`` runs the command line."""

import sys

from deadrelu.cli import main

sys.exit(main())
