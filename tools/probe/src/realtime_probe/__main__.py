"""`python -m realtime_probe`: the same as the `realtime-probe` console script."""

import sys

from realtime_probe.cli import main

sys.exit(main())
