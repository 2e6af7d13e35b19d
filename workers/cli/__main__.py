"""``python -m workers.cli ...`` (the subprocess form the tests and the demo's alerts app use)."""

import sys

from workers.cli import main

sys.exit(main())
