#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install wordpos with its test extras. Idempotent: a second run is fast.
# TORCH_SPEC picks the torch build (default: the CPU build 2.13.0; e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
# for a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "wordpos needs Python 3.11+"'
installed() { .venv/bin/python -c "import torch, transformer_lens, nnsight, wordpos.probing" >/dev/null 2>&1; }
if ! installed; then  # a fresh install writes ~2 GB into .venv and unpacks wheels in the temporary folder
  "$PY" - "${NEED_GB:-3}" <<'PYEOF' || exit 1
import os, shutil, sys, tempfile
try:
    need = float(sys.argv[1])
except ValueError:
    sys.exit(f"setup.sh: NEED_GB must be a number of gigabytes (e.g. NEED_GB=3, or 0 to skip the check), got {sys.argv[1]!r}.")
disks = {}  # one check per disk: this checkout's (.venv) first, then the temporary folder's
for where in (os.path.realpath("."), os.path.realpath(tempfile.gettempdir())):
    disks.setdefault(os.stat(where).st_dev, where)
for where in disks.values():
    free = shutil.disk_usage(where).free / 2**30
    if free < need:
        sys.exit(f"setup.sh: only {free:.1f} GB free on the disk holding {where}; installing torch, transformer_lens "
                 f"and nnsight needs about {need:g} GB. Free some space (old virtual environments, scratch folders, "
                 f"`pip cache purge`) and run it again, or set NEED_GB=0 to try anyway.")
PYEOF
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0} 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, transformer_lens, nnsight, wordpos.probing, wordpos.patching, wordpos.circuit" \
  || { echo "setup.sh: the install did not complete; see the pip output above" >&2; exit 1; }
