#!/bin/bash
# Wall and CPU seconds of `qkhooks demo` for the main checkout (baseline) and this worktree, back to back in one
# run, with the load average before each. CPU seconds (user + sys) move far less with other jobs' load than wall.
# Usage: benchmarks/demo_time.sh MAIN_CHECKOUT THIS_CHECKOUT PYTHON
main=${1:-/work/main}; here=${2:-$(pwd)}; py=${3:-/work/main/.venv/bin/python}
for who in main here; do
  dir=${!who}; out=$(mktemp -d)
  echo "$who start $(date -u +%FT%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd "$out" && PYTHONPATH=$dir /usr/bin/time -f "$who wall %e user %U sys %S" nice -n 10 "$py" -m qkhooks demo --out "$out/demo" \
     > "$out/log" 2> "$out/time"; tail -1 "$out/time"; du -sh "$out/demo"; ls -l "$out/demo/index.html")
done
echo "end $(date -u +%FT%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
