#!/usr/bin/env bash
# Set up .venv and run the whole test suite: Rust unit tests (no Python linked), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash scripts/llamacpp.sh  # llama.cpp, the oracle of the GGUF tests (built once, then cached)
# the project's habits: one format and lint for Python (pyproject.toml's [tool.ruff]) and Rust
ruff check python tests bench scripts
ruff format --check python tests bench scripts
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
# the bindings too (checked, not linked: no libpython needed)
cargo clippy --locked --all-targets --features python -- -D warnings
cargo test --locked --quiet
set +e
TUNEX_REQUIRE_ORACLES=1 TUNEX_REQUIRE_NATIVE=1 python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that must fail loudly, never pass as green.
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
