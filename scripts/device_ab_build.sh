#!/usr/bin/env bash
# Build .ab/<name>/ for scripts/device_ab.sh: wordpos's wheel and its scripts/ at a git revision ("." = the working
# tree, committed or not), so that builds can be timed against each other in one call on one lent machine (issue
# 14: the lent machines' hosts differ, ~30% in host-bound stages between two H100 loans, so a baseline is only
# comparable when it is rerun beside the change).
#   bash scripts/device_ab_build.sh 9ff8b7a before && bash scripts/device_ab_build.sh . after
# (PYTHON= names the interpreter that builds the wheels; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: device_ab_build.sh REVISION|. NAME}
name=${2:?usage: device_ab_build.sh REVISION|. NAME}
[[ "$name" =~ ^[A-Za-z0-9_.-]+$ && "$name" != .* ]] || { echo "NAME must be a plain folder name (letters, digits, _ . -), got '$name'"; exit 2; }
dest=.ab/$name
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
if [ "$rev" = . ]; then
  # tracked and untracked files that exist (a tracked file deleted in the working tree is left out)
  git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -cf - -T - | tar -xf - -C "$src"
else
  git archive "$rev" | tar -x -C "$src"
fi
rm -rf "$dest" && mkdir -p "$dest"
"${PYTHON:-.venv/bin/python}" -m pip wheel -q --no-deps -w "$dest" "$src" > "$src/pip.log" 2>&1 || { tail -20 "$src/pip.log"; exit 1; }
cp -r "$src/scripts" "$dest/scripts"
if [ "$rev" = . ]; then
  commit=$(git rev-parse --short HEAD)
  [ -z "$(git status --porcelain)" ] || commit="$commit + uncommitted changes"  # (an if: a clean tree is no error)
else
  commit=$(git rev-parse --short "$rev")
fi
echo "$rev ($commit) -> $dest: $(du -sh "$dest" | cut -f1)" | tee "$dest/REVISION"
