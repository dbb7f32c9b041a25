#!/usr/bin/env bash
# Speed round 3 (issue 29) on one GPU, random LLaMA-7B, in groups that fit one device call:
#   fp8:    fine-tuning with fp8-base on the recipe's real path (dynamic shapes), then after 200 warm-up steps (as
#           newshapes does for bf16); its fixed shape 4 x 512 is in quantized_bases.sh's train group
#   recipe: the recipe's real path in bf16, then with the allocator's expandable segments (varying shapes may make
#           it free its cache and wait for the GPU), then profiled: where its time goes against the fixed shape, and
#           what the host runs while the GPU waits
#   shapes: the real path in bf16 with smaller micro-batches (at most 4,096 and 2,048 tokens, as 4 x 512): whether
#           its gap to the fixed shape follows the micro-batches' size (the default's average 8,191 tokens a step, in
#           one micro-batch of 64 rows or two of about 32); each run logs the GPU's clock and power (logged_run.sh)
#   newshapes: the real path in bf16 after 200 warm-up steps instead of 20 (its 30 timed steps otherwise meet about
#           18 micro-batch shapes not seen before: whether what each new shape costs the host, such as cuDNN's plan
#           for the attention, is the gap to the fixed shape), then with cuDNN's attention off (flash attention)
#   warm:   compiled batch-1 decoding with one inductor cache, in this process and stored on disk (StoredDecode):
#           a cold start that compiles both, then new processes: one that loads the stored step, one that compiles
#           again with warm caches (first token)
#   tuning: fine-tuning at 4 x 512 in bf16: profiled (where the GPU waits), then with Inductor's GEMM autotuning and
#           with its coordinate-descent tuning of the generated kernels (environment switches, no code change)
#   gptfast: compiled batch-1 decoding beside gpt-fast's (carry its model.py, generate.py and tokenizer.py in
#           GPT_FAST, default .gptfast, and a tiktoken wheel)
#   cli:    the default decoding step through generate/base.py on a GPU (random TinyLlama-1.1B): new processes that
#           compile and store the step (greedy, then sampling), then load it
#   fused:  Liger-Kernel against Inductor and eager, op by op (bench/fused_kernels.py; pip install liger-kernel)
# Usage: bash bench/speed_round3.sh LOG_DIR GROUP...  (each run's last lines go to LOG_DIR/NAME.txt)
# The recipe's data follow the Alpaca records and tokenizer of DATA (default ../shared/data); where that folder
# does not travel, copy alpaca/alpaca_data_first335.json and llama_tokenizer/tokenizer.model into one that does.
set -uo pipefail
log=$1; shift
data=${DATA:-../shared/data}
source "$(dirname "$0")/logged_run.sh"
T="python3 bench/train_throughput.py"
R="--alpaca true --global_batch_size 64 --micro_batch_size null --micro_batch_tokens 8192 --warmup_steps 20 --steps 10
   --runs 3 --data_file $(ls "$data"/alpaca*.json "$data"/alpaca/*.json 2>/dev/null | head -1)
   --tokenizer_path $(ls "$data"/tokenizer.model "$data"/llama_tokenizer/tokenizer.model 2>/dev/null | head -1)"
for group in "$@"; do
    case $group in
    fp8)
        run recipe_fp8 170 $T $R --precision fp8-base
        run recipe_fp8_long_warmup 300 $T $R --precision fp8-base --warmup_steps 200 ;;
    recipe)
        run recipe_bf16 170 $T $R
        PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run recipe_bf16_expandable 170 $T $R
        run recipe_bf16_profile 200 $T $R --runs 1 --profile true ;;
    shapes)
        for tokens in 4096 2048; do run "recipe_bf16_${tokens}" 170 $T $R --micro_batch_tokens $tokens; done ;;
    newshapes)
        run recipe_bf16_long_warmup 300 $T $R --warmup_steps 200
        run recipe_bf16_flash_attention 170 $T $R --cudnn_attention false ;;
    warm)
        cache=$(mktemp -d)
        for run_modes in cold:compiled,stored warm:stored warm:compiled; do  # each start in a new process
            name=${run_modes/:/_}
            TORCHINDUCTOR_CACHE_DIR=$cache run "decode_${name//,/_}" 280 python3 bench/generate_throughput.py \
                --modes "${run_modes#*:}" --repeats 3
        done ;;
    tuning)
        F="python3 bench/train_throughput.py --warmup_steps 4 --steps 4 --runs 3"
        run train_4x512_bf16_profile 150 $F --runs 1 --profile true
        TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 run train_4x512_bf16_autotune_gemm 300 $F
        TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 run train_4x512_bf16_coordinate_descent 200 $F ;;
    gptfast)
        run decode_gpt_fast 300 python3 bench/decode_compile_options.py --variants tuned,gpt-fast \
            --gpt_fast_dir "${GPT_FAST:-.gptfast}" ;;
    cli)
        checkpoint=$(mktemp -d)/tinyllama steps=$(mktemp -d)
        python3 bench/random_checkpoint.py --preset tinyllama-1.1b --output_dir "$checkpoint" \
            --tokenizer_path "$(ls "$data"/tokenizer.model "$data"/llama_tokenizer/tokenizer.model 2>/dev/null | head -1)"
        for start in greedy_stored greedy_loaded sampling_stored sampling_loaded; do
            sampling="--temperature 0"; [[ $start == sampling* ]] && sampling="--temperature 0.8 --top_k 200"
            run "cli_$start" 200 python3 generate/base.py --checkpoint_dir "$checkpoint" --compiled_steps "$steps" \
                --prompt "Once upon a time" --max_new_tokens 200 $sampling
        done ;;
    fused)
        run fused_kernels 90 python3 bench/fused_kernels.py ;;
    *) echo "unknown group $group"; exit 2 ;;
    esac
done
