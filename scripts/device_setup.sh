# Sourced by the device scripts (device_run.sh, device_ab.sh) on a lent machine with no network: installs the wheels
# in .whl/ (scripts/device_wheels.py) into /tmp/site, all but wordpos's own when WITHOUT_WORDPOS=1 (device_ab.sh
# installs each build it compares apart), and compiles bytecode. Logs into $OUT (a directory).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl | { if [ "${WITHOUT_WORDPOS:-0}" = 1 ]; then grep -v '/wordpos-'; else cat; fi; }) \
  > "$OUT/pip.log" 2>&1 || { echo "wheel install failed"; tail -5 "$OUT/pip.log"; }
export PYTHONPATH=/tmp/site
# bytecode, as a normal install has (pip's own compile step is skipped: compileall does it on every core): the lent
# image sets PYTHONDONTWRITEBYTECODE and ships some packages without it (networkx: 0.44-0.69 s of compile per process)
compile_bytecode() {
python3 - "$@" >> "$OUT/compileall.log" 2>&1 <<'PY'
import compileall, importlib.util, os, sys
roots = sys.argv[1:] or ["/tmp/site"]
for name in ("networkx", "sklearn", "plotly") if len(sys.argv) == 1 else ():
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin:
        roots.append(os.path.dirname(spec.origin))
for root in roots:  # in parallel; a read-only or broken file is reported and left as is
    ok = compileall.compile_dir(root, quiet=1, workers=0)
    print(root, "ok" if ok else "errors (read-only or syntax; left as is)", file=sys.stderr)
PY
}
compile_bytecode
