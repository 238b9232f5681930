#!/usr/bin/env bash
# Where the GPU time of `wordpos run` goes (issue 14): cProfile of the SmolLM2-architecture benchmark, the 60
# heaviest functions by cumulative and by own time, written under $OUT (run like scripts/device_run.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site
python3 -m cProfile -o "$OUT/prof.out" scripts/bench.py --model smollm2-arch --device cuda --keep /tmp/run > "$OUT/bench.log" 2>&1
grep -v "it/s\]" "$OUT/bench.log" | tail -14
python3 -c "
import pstats, io
for key in ('cumulative', 'tottime'):
    s = io.StringIO(); pstats.Stats('$OUT/prof.out', stream=s).sort_stats(key).print_stats(60); open('$OUT/prof-' + key + '.txt', 'w').write(s.getvalue())
"
python3 -c "import json; s = json.load(open('/tmp/run/patch_ablation/summary.json')); print(json.dumps(s['top_k_ablation']['config']['timings']))"
grep -E "ablation|refit|fit_probes|lbfgs|head_roles|attribute|edge_circuit|evaluate_masks|score_edges|save_figures|write_html" "$OUT/prof-cumulative.txt" | head -30
