# Sourced by scripts/run and scripts/test: create .venv and install ConvLens into it, once,
# and again whenever pyproject.toml changes. Needs Python >= 3.11 and access to PyPI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CONVLENS_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  BASE="${PYTHON:-}"
  if [ -z "$BASE" ]; then
    for cand in python3.13 python3.12 python3.11 python3; do
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        BASE="$cand"; break
      fi
    done
  fi
  [ -n "$BASE" ] || { echo "ConvLens needs Python 3.11 or newer (set PYTHON=/path/to/python3)" >&2; exit 1; }
  echo "Creating $VENV with $BASE ..." >&2
  "$BASE" -m venv "$VENV"
fi
STAMP="$VENV/.convlens-installed"
WANT="$(cat "$ROOT/pyproject.toml" | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "Installing ConvLens and its dependencies into $VENV (first run: a few minutes) ..." >&2
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
