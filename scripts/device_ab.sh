#!/usr/bin/env bash
# Time builds of wordpos against each other in one call on a lent GPU machine (issue 14): the machines' hosts
# differ between loans, so a change is measured beside its baseline, alternating, on the same machine and card.
# Each build is .ab/<name>/ (scripts/device_ab_build.sh: its wheel and its own scripts/bench.py); the other packages
# come from .whl/ (scripts/device_wheels.py; its wordpos wheel is not used). Writes summary.txt (the stages' seconds
# and efficiencies per build and round) and every record and log into ab-logs.tgz under $OUT.
#   AB="before after" ROUNDS=2 BENCH="--model smollm2-arch" PROFILE_BUILD=after bash scripts/device_ab.sh
# PROFILE_BUILD adds one more run of that build with --profile-stages $PROFILE_STAGES (default: probe ablation circuit);
# SYNC_BUILD one with --sync-audit (where the host waits for the device, per stage and line: counts, not times).
set -uo pipefail
FINAL=${OUT:-/tmp/out}
OUT=/tmp/device-ab-logs
mkdir -p "$OUT" "$FINAL"
pack() { cp "$OUT/summary.txt" "$FINAL"/ 2>/dev/null; tar czf "$FINAL/ab-logs.tgz" -C "$OUT" . ; }
trap pack EXIT
WITHOUT_WORDPOS=1 source scripts/device_setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
failed=0
for b in ${AB:?set AB to the builds under .ab/}; do
  # a fresh target: on a warm machine pip would keep an earlier build there (it only warns, and exits 0)
  rm -rf "/tmp/wp-$b"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "/tmp/wp-$b" .ab/"$b"/wordpos-*.whl \
    >> "$OUT/pip.log" 2>&1 || { echo "install of $b failed: its runs are skipped" | tee -a "$OUT/summary.txt"; failed=1; }
  compile_bytecode "/tmp/wp-$b"
  cat ".ab/$b/REVISION" >> "$OUT/summary.txt"
done
run() {  # build, tag, extra arguments
  local b=$1 tag=$2; shift 2; local t0=$SECONDS rc
  if [ ! -d "/tmp/wp-$b/wordpos" ]; then echo "== $tag skipped: $b is not installed" | tee -a "$OUT/summary.txt"; return; fi
  PYTHONPATH="/tmp/wp-$b:/tmp/site" python3 ".ab/$b/scripts/bench.py" --device "${DEVICE:-cuda}" ${BENCH:---model smollm2-arch} \
    --out "$OUT/$tag.json" "$@" > "$OUT/$tag.log" 2>&1
  rc=$?
  [ $rc = 0 ] || failed=1
  echo "== $tag rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  grep -E "^(plain forward|probe|activation|attribution|path|ablation|circuit|parts of|whole run)" "$OUT/$tag.log" \
    | tee -a "$OUT/summary.txt"
}
for r in $(seq "${ROUNDS:-2}"); do
  for b in $AB; do run "$b" "$b-$r"; done
  pack
done
if [ -n "${PROFILE_BUILD:-}" ]; then
  run "$PROFILE_BUILD" "$PROFILE_BUILD-profiled" --profile-stages ${PROFILE_STAGES:-probe ablation circuit}
fi
if [ -n "${SYNC_BUILD:-}" ]; then
  run "$SYNC_BUILD" "$SYNC_BUILD-syncs" --sync-audit
  grep -E "^(syncs in|  +[0-9]+  )" "$OUT/$SYNC_BUILD-syncs.log" | tee -a "$OUT/summary.txt"
fi
exit $failed  # non-zero when a build did not install or a run failed (summary.txt says which)
