#!/usr/bin/env bash
# Runs every stage of benchmarks/build_options.py in priority order, each under the shared CPU lock.
# Usage: bash benchmarks/build_options_run.sh [CACHE]   (log lines go to CACHE/run.log)
set -u
CACHE=${1:-/tmp/build_options_cache}
mkdir -p "$CACHE"
B="python benchmarks/build_options.py"
run() { echo "=== $(date +%T) $*" >> "$CACHE/run.log"; flock /tmp/protoad-bench.lock $B "$@" --cache "$CACHE" >> "$CACHE/run.log" 2>&1 || echo "=== FAILED: $*" >> "$CACHE/run.log"; }
[ -f "$CACHE/crop-bilinear/prototypes.npz" ] || run fit crop-bilinear
[ -f "$CACHE/crop-bilinear/score.json" ] || run score crop-bilinear --fp16
VARIANT=$(python -c "
import json,sys; v=json.load(open('$CACHE/crop-bilinear/score.json'))['variants']
m=lambda k: sum(v[k][x] for x in ('image_auroc','pixel_auroc','pro'))
print('norm' if m('norm') > m('raw') else 'raw')" 2>/dev/null || echo raw)
[ -f "$CACHE/crop-bilinear/e2e_$VARIANT.json" ] || run e2e crop-bilinear --variant "$VARIANT"
[ -f "$CACHE/wrn.json" ] || run wrn
for cfg in squash-bilinear letterbox-bilinear crop-nearest; do
  [ -f "$CACHE/$cfg/prototypes.npz" ] || run fit $cfg
  [ -f "$CACHE/$cfg/score.json" ] || run score $cfg
done
echo "=== $(date +%T) done" >> "$CACHE/run.log"
