"""`python -m benchmarks` (what `scripts/dev bench` runs)."""

import sys

from .cli import main

sys.exit(main())
