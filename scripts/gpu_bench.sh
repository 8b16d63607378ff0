#!/usr/bin/env bash
# The GPU measurements behind the README's performance table, in one run on one GPU (an H200 took the
# shapes of shared/PERFORMANCE.md). Needs a python3 with CUDA torch and transformers; the package runs from src/.
#
#   bash scripts/gpu_bench.sh [decode|train|all] [OUT_DIR]
#
# Writes one JSON per case into OUT_DIR (default: $OUT, else bench-out) and a log. Each case is a separate
# process, so one failure (reported in the log) does not stop the others.
set -uo pipefail
part=${1:-all}
out=${2:-${OUT:-bench-out}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
log="$out/gpu_bench.log"

case_() {  # NAME ARGS...: one bench run, its JSON in $out/NAME.json
    local name=$1
    shift
    echo "=== $name: minigpt bench $*" | tee -a "$log"
    local start=$SECONDS
    if ! "$py" -m minigpt.cli bench "$@" --out "$out/$name.json" >>"$log" 2>&1; then
        echo "!!! $name failed (see $log)" | tee -a "$log"
    fi
    echo "    $((SECONDS - start)) s" | tee -a "$log"
}

"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name(0))" | tee -a "$log"

if [[ $part == decode || $part == all ]]; then
    # Batch-1 chat decode (static engine vs transformers generate vs the original demos' fp16 eager), TTFT for a
    # one-image prompt, 16 concurrent requests through the scheduler, and the greedy-identity check on the GPU.
    case_ decode_7b generate --llm llama-7b --vision eva_vit_g --prompt-tokens 36 --new-tokens 128 --repeats 3 \
        --concurrent 16 --reference-style
    case_ decode_7b_compiled generate --llm llama-7b --vision eva_vit_g --prompt-tokens 36 --new-tokens 128 \
        --repeats 3 --engines static --compile --concurrent 16
fi
if [[ $part == train || $part == all ]]; then
    case_ train_7b_stage1 train --llm llama-7b --vision eva_vit_g --stage 1 --batch-size 64 --compile --reference-style
    case_ train_7b_stage2 train --llm llama-7b --vision eva_vit_g --stage 2 --batch-size 12 --compile --reference-style
    case_ train_13b_stage1 train --llm llama-13b --vision eva_vit_g --stage 1 --batch-size 64 --compile
    case_ train_7b_vision_every_step train --llm llama-7b --vision eva_vit_g --stage 1 --batch-size 64 --compile \
        --vision-every-step
    case_ train_7b_lengths train --llm llama-7b --vision eva_vit_g --stage 2 --batch-size 12 --lengths cc_sbu_align \
        --batching pad,group,pack --pack-len 2048 --compile
fi
echo "done: $(ls "$out")" | tee -a "$log"
