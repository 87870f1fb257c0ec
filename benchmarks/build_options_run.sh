#!/usr/bin/env bash
# Runs every stage of benchmarks/build_options.py in priority order under ONE acquisition of the
# shared CPU lock (stages that already have results in CACHE are skipped, so a rerun resumes).
# Usage: bash benchmarks/build_options_run.sh [CACHE]      (log: CACHE/run.log)
# Subsets: train = every 8th train/good image (96); crop-bilinear scored on all 582 test images,
# the other configurations on every 2nd (291, stratified: the list is sorted by defect type) and
# crop-bilinear re-scored on the same 291 for the side-by-side tables; ORT runs on the same 291.
set -u
CACHE=${1:-/tmp/build_options_cache}
mkdir -p "$CACHE"
if [ -z "${BUILD_OPTIONS_LOCKED:-}" ]; then
  BUILD_OPTIONS_LOCKED=1 exec flock /tmp/protoad-bench.lock bash "$0" "$CACHE"
fi
B="python benchmarks/build_options.py"
run() { echo "=== $(date +%T) $*" >> "$CACHE/run.log"; $B "$@" --cache "$CACHE" >> "$CACHE/run.log" 2>&1 || echo "=== FAILED: $*" >> "$CACHE/run.log"; }
[ -f "$CACHE/crop-bilinear/prototypes.npz" ] || run fit crop-bilinear
[ -f "$CACHE/crop-bilinear/score.json" ] || run score crop-bilinear --fp16
VARIANT=$(python -c "
import json; v=json.load(open('$CACHE/crop-bilinear/score.json'))['variants']
m=lambda k: sum(v[k][x] for x in ('image_auroc','pixel_auroc','pro'))
print('norm' if m('norm') > m('raw') else 'raw')" 2>/dev/null || echo raw)
[ -f "$CACHE/crop-bilinear/e2e_$VARIANT.json" ] || run e2e crop-bilinear --variant "$VARIANT" --e2e-every 2 --torch-every 4
[ -f "$CACHE/crop-bilinear/score_every2.json" ] || run rescore crop-bilinear --every 2
for cfg in squash-bilinear letterbox-bilinear; do
  [ -f "$CACHE/$cfg/prototypes.npz" ] || run fit $cfg
  [ -f "$CACHE/$cfg/score.json" ] || run score $cfg --test-every 2
done
[ -f "$CACHE/wrn.json" ] || run wrn --every 9
[ -f "$CACHE/crop-nearest/prototypes.npz" ] || run fit crop-nearest
[ -f "$CACHE/crop-nearest/score.json" ] || run score crop-nearest --test-every 2
echo "=== $(date +%T) done" >> "$CACHE/run.log"
