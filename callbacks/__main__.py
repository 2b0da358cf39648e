"""``python -m callbacks``: see :mod:`callbacks.cli`."""

import sys

from callbacks.cli import main

sys.exit(main())
