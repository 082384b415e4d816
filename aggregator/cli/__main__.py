"""``python -m aggregator.cli``: ``tokenguard``."""

import sys

from aggregator.cli.app import main

sys.exit(main())
