#!/usr/bin/env bash
# `make lock`: re-resolve the dependencies to their newest releases, test them, and rewrite requirements/lock.txt
# only when the tests pass.
#
#     make lock                    # about as long as `make test` on a fresh clone, plus the resolve
#     HFF_LOCK_KEEP=1 make lock    # keep the temp folder (its new lock, venv and test log) either way
#
# 1. pip-compile (pip-tools, in a throwaway venv) resolves pyproject.toml's runtime deps, its `dev` extra and the
#    build tools to the newest releases, with torch held at the CPU build `make` installs (torch==2.13.0).
# 2. The working tree (tracked and untracked files, not ignored ones) is copied to a temp folder with the new lock,
#    and `make test` runs there: a new .venv installed from that lock, the extension built, every tier.
# 3. Green: the new lock replaces requirements/lock.txt and the changed pins are printed. Red: the old lock stays.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOCK=requirements/lock.txt
TMP="$(mktemp -d "${TMPDIR:-/tmp}/hff-lock.XXXXXX")"
cleanup() { [[ -n "${HFF_LOCK_KEEP:-}" ]] && echo "lock: kept $TMP" || rm -rf "$TMP"; }
trap cleanup EXIT

echo "lock: resolving the newest releases with pip-compile"
"$PYTHON" -m venv "$TMP/tools"
"$TMP/tools/bin/python" -m pip install -q -U pip pip-tools
"$TMP/tools/bin/python" - "$TMP/lock.in" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
build = [r for r in project["build-system"]["requires"] if not r.startswith("torch")]
reqs = ["torch==2.13.0", *project["project"]["dependencies"], *project["project"]["optional-dependencies"]["dev"], *build]
open(sys.argv[1], "w").write("".join(r + "\n" for r in reqs if not r.replace(" ", "").startswith("torch>")))
PY
(cd "$TMP" && tools/bin/pip-compile -q --upgrade --allow-unsafe --strip-extras --no-emit-index-url \
    --no-emit-find-links --no-emit-trusted-host --no-header -o lock.raw lock.in)
{
    echo "# Exact versions \`make\` installs (as pip constraints; torch itself by the Makefile, CPU build)."
    echo "# Resolved and tested by \`make lock\` (requirements/lock.sh: pip-compile, then \`make test\` on a copy of the"
    echo "# tree) on $(date -u +%Y-%m-%d), Python $("$PYTHON" -c 'import platform; print(platform.python_version(), platform.machine())')."
    sed -e 's/^torch==\([0-9.]*\)+cpu/torch==\1/' -e 's/-r lock\.in/pyproject.toml/' "$TMP/lock.raw"
} > "$TMP/lock.txt"

echo "lock: testing it: make test on a copy of the working tree ($TMP/tree, log $TMP/test.log)"
mkdir "$TMP/tree"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$TMP/tree" 2>/dev/null || true
cp "$TMP/lock.txt" "$TMP/tree/$LOCK"
if ! make -C "$TMP/tree" test > "$TMP/test.log" 2>&1; then
    tail -n 30 "$TMP/test.log"
    HFF_LOCK_KEEP=1
    echo "lock: the tests fail with the newest releases; $LOCK is unchanged (the new lock and its log: $TMP)"
    exit 1
fi
tail -n 3 "$TMP/test.log"
echo "lock: green; pins that changed:"
diff <(grep -E '^[A-Za-z0-9_.-]+==' "$LOCK" 2>/dev/null || true) <(grep -E '^[A-Za-z0-9_.-]+==' "$TMP/lock.txt") \
    | grep -E '^[<>]' || echo "  (none)"
cp "$TMP/lock.txt" "$LOCK"
echo "lock: wrote $LOCK"
