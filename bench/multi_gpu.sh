#!/usr/bin/env bash
# Training throughput on one host with 2 GPUs: 7B per GPU on 1 GPU, with DDP and with FSDP; 65B with FSDP.
# Usage: bash bench/multi_gpu.sh LOG_DIR
set -euo pipefail
log=$1
B="python3 bench/train_throughput.py --warmup_steps 5 --steps 5 --runs 3"
$B --devices 1 2>&1 | tail -5 | tee $log/7b_1gpu.txt
$B --devices 2 --strategy ddp 2>&1 | tail -5 | tee $log/7b_ddp2.txt
$B --devices 2 --strategy fsdp 2>&1 | tail -5 | tee $log/7b_fsdp2.txt
$B --devices 2 --strategy fsdp --preset llama-65b --micro_batch_size 1 --compile false 2>&1 | tail -5 | tee $log/65b_fsdp2.txt
