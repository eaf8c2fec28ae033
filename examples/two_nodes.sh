#!/usr/bin/env bash
# Two nodes behind one Redis: a client may connect to either and resume on the other.
#   bash examples/two_nodes.sh            (needs redis-server, and the "redis" extra)
# Then: a WebSocket to ws://127.0.0.1:8001/ws?token=secret-alice receives
#   curl -X POST http://127.0.0.1:8002/jobs/alice    (published on the other node)
set -euo pipefail
cd "$(dirname "$0")/.."
redis-server --port 6390 --save '' --appendonly no --daemonize yes
export ASGI_EVENTS_REDIS_URL=redis://127.0.0.1:6390/0
trap 'kill 0; redis-cli -p 6390 shutdown nosave >/dev/null 2>&1 || true' EXIT
.venv/bin/hypercorn examples.starlette_app:app --bind 127.0.0.1:8001 &
.venv/bin/hypercorn --worker-class trio examples.starlette_app:app --bind 127.0.0.1:8002 &
wait
