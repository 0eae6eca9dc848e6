"""``python -m fanlens``: the ``fanlens`` command."""

import sys

from .cli import main

sys.exit(main())
