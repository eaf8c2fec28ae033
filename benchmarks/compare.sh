#!/usr/bin/env bash
# Before/after: the same fanout.py command on two commits, interleaved (A B B A ...) so that the
# machine's drift over time falls on both alike. Each commit is checked out in a worktree of its
# own and run with the project's .venv, its package first on PYTHONPATH.
#
#   bash benchmarks/compare.sh BASE NEW ROUNDS -- FANOUT_ARGS...
#   bash benchmarks/compare.sh f5ef40a HEAD 3 -- --server uvicorn --variants raw asgi-events
#
# COMPARE_NAME names the log folder instead of <base>-<new>.
# HARNESS=new runs NEW's fanout.py on both packages (the same command and load client on both,
# for a base whose benchmark has changed since); by default each commit runs its own.
#
# Logs go to benchmarks/compare/<base>-<new>/ (git-ignored); summarize them with
# `.venv/bin/python benchmarks/compare_summary.py benchmarks/compare/<base>-<new>`.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(git rev-parse --short "$1") new=$(git rev-parse --short "$2") rounds=$3
shift 3
[ "${1:-}" = "--" ] && shift
out="benchmarks/compare/${COMPARE_NAME:-$base-$new}"
mkdir -p "$out"
trees=$(mktemp -d)
trap 'git worktree remove --force "$trees/base" 2>/dev/null; git worktree remove --force "$trees/new" 2>/dev/null; rm -rf "$trees"' EXIT
git worktree add -q --detach "$trees/base" "$base"
git worktree add -q --detach "$trees/new" "$new"
run() {  # which
  local log
  log="$out/$1-$(date +%s%N).txt"
  echo "$(date +%T) $1 ($(eval echo "\$$1")): $*" >&2
  PYTHONPATH="$trees/$1/src" .venv/bin/python "$trees/${HARNESS:-$1}/benchmarks/fanout.py" "${args[@]}" >"$log" 2>&1
}
args=("$@")
for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) = 1 ]; then run base; run new; else run new; run base; fi
done
echo "logs: $out" >&2
