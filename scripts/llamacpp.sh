#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp itself, the test-only oracle of tests/test_llamacpp.py and
# tests/test_gguf_quants.py) into the active .venv. It builds llama.cpp from source (minutes), so the
# wheel is built once into a cache folder outside the checkout and reused by later runs (CI's fresh
# clones included); delete that folder to rebuild.
set -euo pipefail
version=0.3.36
wheels=${TUNEX_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunex/wheels}
mkdir -p "$wheels"
if ! ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version (llama.cpp from source, once) into $wheels"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    python -m pip wheel -q --no-deps --no-cache-dir -w "$wheels" "llama-cpp-python==$version"
fi
python -m pip install -q --find-links "$wheels" "llama-cpp-python==$version"
