#!/usr/bin/env bash
# A 7B adapter (random base weights) trained with FSDP on 2 GPUs, then loaded by generate/adapter.py on one GPU:
# the greedy answer printed by the training process and the one of generate/adapter.py are compared.
# Usage: bash bench/fsdp_roundtrip.sh DATA_DIR (alpaca_data_first335.json and the LLaMA tokenizer.model) LOG_DIR [PRECISION]
set -euo pipefail
data=$1; log=$2; precision=${3:-32-true}; tmp=${TMPDIR:-/tmp}/fsdp_roundtrip; out=$tmp/out-$precision
instruction="Recommend a movie for me to watch during the weekend and explain the reason."
python3 bench/random_checkpoint.py --preset llama-7b --tokenizer_path $data/tokenizer.model --output_dir $tmp/ckpt
python3 scripts/prepare_alpaca.py --data_file $data/alpaca_data_first335.json --checkpoint_dir $tmp/ckpt \
  --destination_dir $tmp/alpaca --val_size 35 --skip_bad_records true --max_seq_length 512 > /dev/null
rm -rf $out  # a fresh run each time: an --out_dir holds one run
python3 finetune/adapter.py --checkpoint_dir $tmp/ckpt --data_dir $tmp/alpaca --out_dir $out --devices 2 \
  --strategy fsdp --precision $precision --train.max_steps 4 --train.global_batch_size 8 --train.learning_rate 0.05 --eval.interval 4 \
  --eval.max_new_tokens 20 --compile false --eval.instruction "$instruction" 2>&1 | tee $log/fsdp_finetune.txt | tail -4
python3 generate/adapter.py --checkpoint_dir $tmp/ckpt --adapter_path $out/adapter.safetensors --temperature 0 --precision $precision \
  --max_new_tokens 20 --prompt "$instruction" 2> $log/generate_stderr.txt | tee $log/generate.txt
trained=$(grep -A1 "^$instruction" $log/fsdp_finetune.txt | tail -1 | sed 's/^> //')
generated=$(head -1 $log/generate.txt)
[ "$trained" == "$generated" ] && echo "SAME greedy output in training (FSDP, 2 GPUs) and generate/adapter.py (1 GPU)" \
  || echo "DIFFERENT: training '$trained' vs generate '$generated'"
