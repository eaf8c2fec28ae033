"""Fan-out benchmark: asgi-events against a raw ASGI loop and peer libraries (Starlette +
broadcaster, python-socketio), on hypercorn (asyncio, trio) and uvicorn.

The one command (see ``benchmarks/README.md``)::

    .venv/bin/python benchmarks/fanout.py --server hypercorn-asyncio            # burst
    .venv/bin/python benchmarks/fanout.py --server uvicorn --mode steady
    .venv/bin/python benchmarks/fanout.py --server hypercorn-trio --mode stalled --quick
    .venv/bin/python benchmarks/fanout.py --server uvicorn --mode routing     # two Redis nodes
    .venv/bin/python benchmarks/fanout.py --chart-only

The code is in the ``fanbench`` package next to this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fanbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
