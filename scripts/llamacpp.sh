#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp itself, the test-only oracle of tests/test_llamacpp.py and
# tests/test_gguf_quants.py) into the active .venv. It builds llama.cpp from source (minutes), so the
# wheel is built once into a cache folder outside the checkout and reused by later runs (CI's fresh
# clones included); delete that folder to rebuild.
set -euo pipefail
version=0.3.36
# Built for this CPU (llama.cpp's default -march=native) but without Intel AMX: on a CPU that has
# it (Sapphire Rapids and later), this llama.cpp's AMX matrix products run tile instructions without
# first asking Linux for the AMX register state (arch_prctl ARCH_REQ_XCOMP_PERM), and the process
# dies with SIGILL on the first quantized product. Explicit -mno-amx-* win over -march=native in
# GCC and clang whatever their order. Wheels built before this (with AMX) sat one folder up.
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
wheels=${TUNEX_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunex/wheels}/llama-cpp-no-amx
mkdir -p "$wheels"
if ! ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version (llama.cpp from source, once) into $wheels"
  CFLAGS="${CFLAGS:-} $no_amx" CXXFLAGS="${CXXFLAGS:-} $no_amx" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    python -m pip wheel -q --no-deps --no-cache-dir -w "$wheels" "llama-cpp-python==$version"
fi
python -m pip install -q --find-links "$wheels" "llama-cpp-python==$version"
# the cached build itself, even where pip holds an older build of the same version (an AMX one)
python -m pip install -q --no-deps --force-reinstall "$wheels"/llama_cpp_python-"$version"-*.whl
