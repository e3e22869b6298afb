"""``python -m dist_clip``: the ``dist-clip`` command (``train``/``check``), also what the launch scripts run."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
