#!/usr/bin/env bash
# The README's first command: set up .venv, then run the main job on the built-in default config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
CFG=smollm2_135m_instruct_lora_chatterbot
tunex list-cfg -p smollm2
tunex copy-cfg "$CFG" work_dirs --force
echo "training is not built yet (issue 7); config copied to work_dirs/${CFG}_copy.toml"
