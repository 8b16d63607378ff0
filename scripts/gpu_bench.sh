#!/usr/bin/env bash
# The GPU measurements behind the README's performance table, in one run on one GPU (an H200 took the
# shapes of shared/PERFORMANCE.md). Needs a python3 with CUDA torch and transformers; the package runs from src/.
#
#   bash scripts/gpu_bench.sh [decode|train|memory|all|smoke] [OUT_DIR]
#
# smoke: every case at tiny shapes on the CPU (about 2 minutes; checks the script itself).
# Wheels in .whl/ (e.g. `pip download --no-deps liger-kernel -d .whl`) are installed first, into /tmp/site; with
# liger-kernel importable, the training cases use its fused loss (model.loss_impl auto) and one case compares.
# Writes one JSON per case into OUT_DIR (default: $OUT, else bench-out) and a log. Each case is a separate
# process, so one failure (reported in the log) does not stop the others.
set -uo pipefail
part=${1:-all}
out=${2:-${OUT:-bench-out}}
mkdir -p "$out"
py=${PYTHON:-python3}
site=
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && site=/tmp/site
fi
export PYTHONPATH="$PWD/src${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log="$out/gpu_bench.log"
l7=llama-7b l13=llama-13b vision=eva_vit_g gen=() train=() memory=() new=128
if [[ $part == smoke ]]; then
    l7=tiny l13=tiny vision=tiny new=4 part=all
    gen=(--device cpu --repeats 1) train=(--device cpu --steps 1 --warmup 0 --peak-tflops 0)
    memory=(--device cpu --only tiny-lora)
fi

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
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee -a "$log"

if [[ $part == decode || $part == all ]]; then
    # Batch-1 chat decode (static engine vs transformers generate vs the original demos' fp16 eager), TTFT for a
    # one-image prompt, 16 concurrent requests through the scheduler, and the greedy-identity check on the GPU.
    case_ decode_7b generate --llm $l7 --vision $vision --prompt-tokens 36 --new-tokens $new --repeats 3 \
        --concurrent 16 --reference-style "${gen[@]}"
    case_ decode_7b_compiled generate --llm $l7 --vision $vision --prompt-tokens 36 --new-tokens $new \
        --repeats 3 --engines static --compile --concurrent 16 "${gen[@]}"
fi
if [[ $part == train || $part == all ]]; then
    case_ train_7b_stage1 train --llm $l7 --vision $vision --stage 1 --batch-size 64 --compile --reference-style \
        "${train[@]}"
    case_ train_7b_stage2 train --llm $l7 --vision $vision --stage 2 --batch-size 12 --compile --reference-style \
        "${train[@]}"
    case_ train_13b_stage1 train --llm $l13 --vision $vision --stage 1 --batch-size 64 --compile "${train[@]}"
    case_ train_7b_vision_every_step train --llm $l7 --vision $vision --stage 1 --batch-size 64 --compile \
        --vision-every-step "${train[@]}"
    case_ train_7b_lengths train --llm $l7 --vision $vision --stage 2 --batch-size 12 --lengths cc_sbu_align \
        --batching pad,group,pack --pack-len 2048 --compile "${train[@]}"
    if "$py" -c "import liger_kernel" 2>/dev/null; then
        case_ train_7b_stage2_plain_loss train --llm $l7 --vision $vision --stage 2 --batch-size 12 --compile \
            --loss-impl plain "${train[@]}"
    fi
fi
if [[ $part == memory || $part == all ]]; then
    # The memory planner against the allocator's peak (max_memory_allocated): a 7B LLM projector-only, LoRA and
    # QLoRA at micro-batch 1/4 with and without checkpointing, then the CPU set's tiny/small cases on the GPU.
    case_ memory_plan memory --gpu-llm $l7 --vision $vision "${memory[@]}"
fi
echo "done: $(ls "$out")" | tee -a "$log"
