#!/usr/bin/env bash
# Quantized frozen bases on one GPU (issue 25), random LLaMA weights, in groups that fit one device call:
#   decode: 7B batch-1 decoding with an adapter, compiled: bf16-true, int4-base (also through the CUDA graph); int8-base
#           is in the int8 group
#   nf4:    7B fine-tuning with nf4-base at 1 x 512 with activation checkpointing (peak memory)
#   train:  7B fine-tuning at 4 x 512 in bf16-true, fp8-base and nf4-base (the three side by side in one lease)
#   graphs: 7B decoding through the CUDA graph with fp8-base and nf4-base; int4-base with 16 adapters in one batch
#   65b:    LLaMA-65B fine-tuning with nf4-base at 1 x 512 with activation checkpointing
#   int8:   7B batch-1 decoding, compiled, int8-base profiled (its top kernels), then int8-base and bf16-true with
#           coordinate descent searching all directions (torchao's recommended Inductor setting; int8-base read its
#           weights at 37% of the bandwidth limit without)
#   libraries: nf4-base's layers through torchao and through bitsandbytes, training and decoding (bench/nf4_libraries.py;
#           the bitsandbytes wheel, 43 MB, travels in place of MSLK's: see bench/RESULTS.md), then 7B batch-1
#           decoding with nf4-base compiled (the CUDA graph's eager NF4 ran 8.1 tokens/s)
#   quality: bench/quantized_quality.py on the GPU (bf16; int4-base through its kernel) with a real model that
#           travels: llama2.c's TinyStories model of 500 iterations, from DATA (default ../shared/data)
#   smoke:  TinyLlama-1.1B, one short run of every precision's training and generation paths (no timing)
# Usage: bash bench/quantized_bases.sh LOG_DIR GROUP...  (each run's last lines go to LOG_DIR/NAME.txt)
set -uo pipefail
log=$1; shift
source "$(dirname "$0")/logged_run.sh"
T="python3 bench/train_throughput.py --warmup_steps 4 --steps 4 --runs 3"
G="python3 bench/generate_throughput.py --repeats 5"
for group in "$@"; do
    case $group in
    decode)
        run decode_bf16 150 $G --precision bf16-true --modes compiled
        run decode_int4 220 $G --precision int4-base --modes graph,compiled ;;
    nf4)
        run train_1x512_nf4_checkpointed 100 $T --precision nf4-base --micro_batch_size 1 --activation_checkpointing true ;;
    train)
        for precision in bf16-true fp8-base nf4-base; do run "train_4x512_$precision" 120 $T --precision $precision; done ;;
    graphs)
        run decode_fp8 60 $G --precision fp8-base --modes graph
        run decode_nf4 60 $G --precision nf4-base --modes graph
        run decode_int4_batch 90 $G --precision int4-base --modes batch ;;
    int8)
        run decode_int8_profile 170 python3 bench/decode_compile_options.py --variants tuned --precision int8-base \
            --repeats 3 --profile true
        export TORCHINDUCTOR_COORDINATE_DESCENT_CHECK_ALL_DIRECTIONS=1
        run decode_int8_all_directions 240 $G --precision int8-base --modes compiled
        run decode_bf16_all_directions 240 $G --precision bf16-true --modes compiled
        unset TORCHINDUCTOR_COORDINATE_DESCENT_CHECK_ALL_DIRECTIONS ;;
    libraries)
        run nf4_libraries 380 python3 bench/nf4_libraries.py
        run decode_nf4_compiled 200 $G --precision nf4-base --modes compiled ;;
    quality)
        data=${DATA:-../shared/data}
        run quality_tinystories_500iter 90 python3 bench/quantized_quality.py --accelerator cuda --format llama2c \
            --checkpoint_path "$data/tinystories_llama2c_500iter/model.bin" --max_seq_length 256 \
            --tokenizer_path "$data/stories260K/tok512.model" \
            --data_file "$(ls "$data"/alpaca*.json "$data"/alpaca/*.json 2>/dev/null | head -1)" ;;
    smoke)
        for precision in nf4-base fp8-base; do
            run "smoke_train_$precision" 60 $T --preset tinyllama-1.1b --precision $precision --warmup_steps 1 --steps 1 --runs 1
        done
        for precision in int4-base int8-base fp8-base nf4-base; do
            run "smoke_decode_$precision" 60 python3 bench/generate_throughput.py --preset tinyllama-1.1b --precision $precision \
                --repeats 1 --max_new_tokens 16 --batch_size 4 --modes eager,graph,batch
        done ;;
    65b)
        run train_65b_1x512_nf4_checkpointed 420 $T --preset llama-65b --precision nf4-base --micro_batch_size 1 \
            --activation_checkpointing true --warmup_steps 3 --steps 3 --runs 2 ;;
    *) echo "unknown group $group"; exit 2 ;;
    esac
done
