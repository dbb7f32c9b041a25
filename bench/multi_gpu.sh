#!/usr/bin/env bash
# Multi-GPU runs of issue 6 on one host (2 GPUs): 7B per-GPU throughput on 1 GPU, DDP and FSDP; 65B with FSDP;
# a 7B adapter trained with FSDP on 2 GPUs, then loaded by generate/adapter.py on one GPU (greedy outputs compared).
# Usage: bash bench/multi_gpu.sh DATA_DIR (holding alpaca_data_first335.json and the LLaMA tokenizer.model) LOG_DIR
set -euo pipefail
data=$1; log=$2; tmp=${TMPDIR:-/tmp}/multi_gpu
B="python3 bench/train_throughput.py --warmup_steps 5 --steps 5 --runs 3"
$B --devices 1 2>&1 | tail -5 | tee $log/7b_1gpu.txt
$B --devices 2 --strategy ddp 2>&1 | tail -5 | tee $log/7b_ddp2.txt
$B --devices 2 --strategy fsdp 2>&1 | tail -5 | tee $log/7b_fsdp2.txt
$B --devices 2 --strategy fsdp --preset llama-65b --micro_batch_size 1 --compile false 2>&1 | tail -5 | tee $log/65b_fsdp2.txt

instruction="Recommend a movie for me to watch during the weekend and explain the reason."
python3 bench/random_checkpoint.py --preset llama-7b --tokenizer_path $data/tokenizer.model --output_dir $tmp/ckpt
python3 scripts/prepare_alpaca.py --data_file $data/alpaca_data_first335.json --checkpoint_dir $tmp/ckpt \
  --destination_dir $tmp/alpaca --val_size 35 --skip_bad_records true --max_seq_length 512 > /dev/null
python3 finetune/adapter.py --checkpoint_dir $tmp/ckpt --data_dir $tmp/alpaca --out_dir $tmp/out --devices 2 \
  --strategy fsdp --train.max_steps 4 --train.global_batch_size 8 --train.learning_rate 0.05 --eval.interval 4 \
  --eval.max_new_tokens 20 --compile false --eval.instruction "$instruction" 2>&1 | tee $log/fsdp_finetune.txt | tail -4
python3 generate/adapter.py --checkpoint_dir $tmp/ckpt --adapter_path $tmp/out/adapter.safetensors --temperature 0 \
  --max_new_tokens 20 --prompt "$instruction" 2> $log/generate_stderr.txt | tee $log/generate.txt
trained=$(grep -A1 "^$instruction" $log/fsdp_finetune.txt | tail -1 | sed 's/^> //')
generated=$(head -1 $log/generate.txt)
[ "$trained" == "$generated" ] && echo "SAME greedy output in training (FSDP, 2 GPUs) and generate/adapter.py (1 GPU)" \
  || echo "DIFFERENT: training '$trained' vs generate '$generated'"
