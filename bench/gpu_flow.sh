#!/usr/bin/env bash
# A user's whole flow on a GPU, through the CLI, as `python -m phi3_lora` runs it: validate, train (QLoRA with the
# GPU defaults: compiled layers, packing, Liger, cuDNN attention; then under an 8 GiB budget), stop and resume,
# compare, evaluate, and every export (zip, merge, GGUF), each verified by reloading it. The test suite runs on CPUs
# only (CI has no GPU), so this is where the GPU-only paths meet a real run end to end. Run with `bash`:
#
#   bash bench/gpu_flow.sh            # on the device tool's machine, carry=[".whl"] (bench/carry_wheels.sh)
#   FLOW_CPU=1 bash bench/gpu_flow.sh # the same steps here on the CPU with a smaller model (checks the script)
#
# Each step's command, exit status, time and output go to $OUT/flow.log; a summary table ends it. A failing step
# does not stop the ones after it that do not depend on it.
set -uo pipefail
OUT=${OUT:-/tmp/out}
WORK=${FLOW_ROOT:-/tmp/phi3_lora_flow}
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK"
LOG=$OUT/flow.log
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PHI3_LORA_RUNS="$WORK/runs"
# Into the interpreter's own site-packages, not a PYTHONPATH folder: each export's verification runs a fresh
# `python -I` without PYTHON* variables, as a user's machine would, and must find the same packages.
if [ -z "${FLOW_CPU:-}" ] && [ -d .whl/proj ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --break-system-packages \
        .whl/proj/*.whl .whl/flow/*.whl >> "$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
fi
PY=${PYTHON:-python3}
SUMMARY=()

wants() {  # FLOW_ONLY (an extended regex of step names) picks steps, e.g. FLOW_ONLY='model|train|export-gguf'
    [ -z "${FLOW_ONLY:-}" ] || [[ $1 =~ ^(${FLOW_ONLY})$ ]]
}

step() {  # step NAME COMMAND...: runs it, logs it, records "NAME rc seconds"
    local name=$1; shift
    wants "$name" || return 0
    local t0=$(date +%s)
    { echo; echo "=== $name: $*"; } >> "$LOG"
    "$@" >> "$LOG" 2>&1
    local rc=$?
    SUMMARY+=("$name rc=$rc $(( $(date +%s) - t0 ))s")
    echo "--- $name rc=$rc" >> "$LOG"
    return $rc
}

run_id() {  # the newest run folder's name under $PHI3_LORA_RUNS
    ls -t "$PHI3_LORA_RUNS" 2>/dev/null | grep -v '^\.' | head -1
}

{ $PY -c 'import torch, transformers, peft, trl, bitsandbytes; print("torch", torch.__version__, "cuda",
torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__,
"bitsandbytes", bitsandbytes.__version__)'; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; } \
    >> "$LOG" 2>&1

# A small model of Phi-3's layout (fused qkv and gate_up, the real tokenizer and chat template), random weights:
# the flow checks that every step works on the GPU, not what the model says.
step model $PY - "$WORK/model" <<'PY'
import os
import sys
from pathlib import Path
from bench.model_folders import ensure_tokenizer, make_phi3_mini
tok_dir = Path(".whl/phi3_tokenizer") if Path(".whl/phi3_tokenizer/tokenizer_config.json").exists() else \
    ensure_tokenizer(Path("/tmp/phi3_lora_flow_tokenizer"))
cpu = bool(os.environ.get("FLOW_CPU"))
shape = ({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 4} if cpu else
         {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 6, "num_attention_heads": 16,
          "num_key_value_heads": 16})
print("saved", make_phi3_mini(Path(sys.argv[1]), tok_dir, shape, device="cpu"))
PY
MODEL=$WORK/model
DATA=data/sample_chat.jsonl
COMMON=(--model "$MODEL" --data "$DATA" --train.max_steps 12 --train.logging_steps 2 --train.eval_steps 6
        --train.save_steps 6 --train.eval_answers false)
if [ -n "${FLOW_CPU:-}" ]; then COMMON+=(--preset quick-cpu); fi

step validate $PY -m phi3_lora validate "$DATA" --stats --model "$MODEL"
step train $PY -m phi3_lora train "${COMMON[@]}"
RUN=$(run_id)
echo "run: $RUN" >> "$LOG"
if [ -z "${FLOW_CPU:-}" ]; then
    step train-8gib $PY -m phi3_lora train "${COMMON[@]}" --train.memory_budget_gb 8
    step train-16bit $PY -m phi3_lora train "${COMMON[@]}" --model.load_in_4bit false
fi

# stop and resume: a background run, stopped once it has a checkpoint, then resumed to its end
if wants background; then
step background $PY -m phi3_lora train "${COMMON[@]}" --train.max_steps 40 --background
BG=$(run_id)
for _ in $(seq 1 240); do
    ls -d "$PHI3_LORA_RUNS/$BG"/checkpoints/checkpoint-* > /dev/null 2>&1 && break
    sleep 1
done
step stop $PY -m phi3_lora stop "$BG"
sleep 5
step runs-after-stop $PY -m phi3_lora runs
step resume $PY -m phi3_lora resume "$BG"
for _ in $(seq 1 300); do
    [ -d "$PHI3_LORA_RUNS/$BG/adapter" ] && break
    sleep 1
done
step runs-after-resume $PY -m phi3_lora runs
fi

step compare $PY -m phi3_lora compare --adapter "$PHI3_LORA_RUNS/$RUN" --prompt "Say hello in three words." \
    --max-new-tokens 24 --seed 1
step compare-sampled $PY -m phi3_lora compare --adapter "$PHI3_LORA_RUNS/$RUN" --prompt "Name a colour." \
    --max-new-tokens 24 --temperature 0.8 --top-p 0.9 --seed 3
step evaluate $PY -m phi3_lora evaluate --adapter "$PHI3_LORA_RUNS/$RUN" --max-rows 6 --max-new-tokens 24
step export-zip $PY -m phi3_lora export --adapter "$PHI3_LORA_RUNS/$RUN" --zip "$WORK/zips"
step export-merge $PY -m phi3_lora export --adapter "$PHI3_LORA_RUNS/$RUN" --merge "$WORK/merged"
step export-gguf $PY -m phi3_lora export --adapter "$PHI3_LORA_RUNS/$RUN" --gguf "$WORK/model.gguf"

# The GGUF's own tokenizer against the merged folder's, on one prompt (what its verification compares first)
step gguf-tokens $PY - "$WORK/merged" "$WORK/model.gguf" <<'PY'
import sys
from pathlib import Path
from transformers import AutoTokenizer
from phi3_lora.gguf_verify import _prompt_ids
from phi3_lora.speed import gguf_once
merged, gguf = Path(sys.argv[1]), Path(sys.argv[2])
messages = [{"role": "user", "content": "Say hello in three words."}]
hf = AutoTokenizer.from_pretrained(str(merged))
with gguf_once.parsed_once():
    gg = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
a, b = _prompt_ids(hf, messages), _prompt_ids(gg, messages)
print("merged:", a)
print("gguf:  ", b)
print("merged text:", repr(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))
print("gguf text:  ", repr(gg.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))
print("gguf tokens:", gg.convert_ids_to_tokens(b))
sys.exit(0 if a == b else 1)
PY

[ -n "${RUN:-}" ] && cp "$PHI3_LORA_RUNS/$RUN/events.jsonl" "$OUT/events-train.jsonl" 2>/dev/null
[ -n "${BG:-}" ] && cp "$PHI3_LORA_RUNS/$BG/events.jsonl" "$OUT/events-resumed.jsonl" 2>/dev/null
{ echo; echo "=== summary"; printf '%s\n' "${SUMMARY[@]}"; } | tee -a "$LOG"
