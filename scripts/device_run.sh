#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one call on a lent machine with no network (issue 14): wordpos and the
# packages the machine's image lacks travel as wheels in .whl/ (git-ignored; `.venv/bin/python
# scripts/device_wheels.py` builds them all, ~36 MiB: see its docstring). Writes the JSON records under $OUT and
# every log, with PROFILE=1 also a cProfile of the SmolLM2-architecture benchmark (last, so a time limit cuts only
# it), into $OUT/logs.tgz (the device tool brings back at most 8 files).
set -uo pipefail
for s in ${STEPS:-}; do  # a misspelt step would run nothing and look like success
  case " parity organism smollm2-fp32 e2e-smollm2 smollm2-bf16 sync-audit circuit-profile circuit-host profile " in
    *" $s "*) ;; *) echo "STEPS: no step named $s"; exit 2 ;; esac
done
FINAL=${OUT:-/tmp/out}
OUT=/tmp/device-run-logs
mkdir -p "$OUT" "$FINAL"
pack() { cp "$OUT"/*.json "$OUT/gpu.txt" "$FINAL"/ 2>/dev/null; tar czf "$FINAL/logs.tgz" -C "$OUT" . ; }
trap pack EXIT
source scripts/device_setup.sh  # the wheels of .whl/ into /tmp/site, bytecode compiled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
tag=${TAG:-gpu}
# STEPS="parity organism" runs only the steps named (a rerun of some after a failure); unset, all of them
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
step() { local name=$1; shift; want "$name" || return 0; local t0=$SECONDS; "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0)) s"; grep -v "it/s\]" "$OUT/$name.log" | tail -${TAILN:-16}; }
if [ "${PARITY:-1}" = 1 ]; then  # PARITY=0 skips it (a rerun of the benchmarks alone)
  step parity python3 scripts/device_parity.py --device cuda --out "$OUT/$tag-parity.json"
  pack
fi
step organism python3 scripts/bench.py --model organism --device cuda --out "$OUT/$tag-organism-fp32.json" --markdown
step smollm2-fp32 python3 scripts/bench.py --model smollm2-arch --device cuda --out "$OUT/$tag-smollm2-arch-fp32.json" --markdown
# end to end, as a researcher runs it: a fresh process, imports and model load included
want e2e-smollm2 && python3 -c "import sys; sys.path.insert(0, 'scripts'); from bench import build_smollm2_arch; from pathlib import Path; build_smollm2_arch(Path('/tmp/smollm2-arch'))" > /dev/null 2>&1
step e2e-smollm2 /usr/bin/time -f "END-TO-END %e s" python3 -m wordpos.circuit.cli run --model /tmp/smollm2-arch --device cuda --out /tmp/e2e --quiet
want e2e-smollm2 && grep -h "END-TO-END" "$OUT/e2e-smollm2.log"
step smollm2-bf16 python3 scripts/bench.py --model smollm2-arch --device cuda --dtype bfloat16 --out "$OUT/$tag-smollm2-arch-bf16.json" --markdown
pack  # the records so far are safe before the circuit profile
# where the host waits for the device, per stage and wordpos line (torch's sync debug mode; its times are not figures)
# (its record goes into logs.tgz only: the device tool brings back at most 8 files; its log's tail prints the counts)
mkdir -p "$OUT/syncs"
step sync-audit python3 scripts/bench.py --model smollm2-arch --device cuda --sync-audit --out "$OUT/syncs/$tag-syncs-smollm2-arch.json"
step circuit-profile python3 scripts/profile_circuit.py --device cuda --layer 8 --out "$OUT/$tag-circuit-profile-fp32-L8.json"
# the stage's host share on this machine's CPU (every forward stood in for, the model on the CPU so that no mask
# travels to the GPU): the rest of the stage is the device's
step circuit-host python3 scripts/profile_circuit.py --device cpu --layer 8 --host-only --out "$OUT/$tag-circuit-host-only.json"
pack
if [ "${PROFILE:-0}" = 1 ] && want profile; then
  step profile python3 -m cProfile -o "$OUT/prof.out" scripts/bench.py --model smollm2-arch --device cuda --keep /tmp/prof-run
  python3 -c "
import sys; sys.path.insert(0, 'scripts'); from bench import profile_text
for key, text in profile_text('$OUT/prof.out', 150).items(): open('$OUT/prof-' + key + '.txt', 'w').write(text)
"
  rm -f "$OUT/prof.out"; cp /tmp/prof-run/circuit/circuit.json "$OUT/prof-circuit.txt" 2>/dev/null
fi
