"""The seed's pipeline demo, kept for its readers: it runs `realtime-probe` (tools/probe,
`realtime_probe.cli`).

Same arguments and exit codes: `uv run python scripts/pipeline_demo.py --count 3 --json`.
"""

from __future__ import annotations

import sys

from realtime_probe.cli import main

if __name__ == "__main__":
    sys.exit(main())
