"""``python -m callbacks``: see :mod:`callbacks.runner.cli`."""

import sys

from callbacks.runner.cli import main

sys.exit(main())
