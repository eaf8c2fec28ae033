"""Scale curve (issue 15, item 6): the fan-out burst of ``fanout.py`` at N = 1,000, 5,000 and
10,000 sockets for raw, asgi-events and asgi-events-batch; server CPU per delivery,
deliveries/s, p99 and server RSS against N, as Markdown, JSON and a chart in
``benchmarks/results/scale-<server>.*`` (see ``benchmarks/README.md``)::

    .venv/bin/python benchmarks/scale.py                          # hypercorn-asyncio, 3 runs
    .venv/bin/python benchmarks/scale.py --server uvicorn hypercorn-trio
    .venv/bin/python benchmarks/scale.py --quick                  # smoke: N = 20 and 50
    .venv/bin/python benchmarks/scale.py --chart-only             # redraw from the JSON

The code is ``fanbench/scale.py`` (and ``scale_report.py``) next to this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fanbench.scale import main

if __name__ == "__main__":
    sys.exit(main())
