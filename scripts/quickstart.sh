#!/usr/bin/env bash
# The whole job on a small real pretrained LLaMA (Karpathy's TinyStories 260K, Llama-2 architecture):
# convert the checkpoint, prepare Alpaca, fine-tune an adapter, then answer an instruction with it.
#
#   bash scripts/quickstart.sh               # fetches the model and the data from their public homes
#   bash scripts/quickstart.sh ../shared/data  # or takes them from a local folder of the same layout
#
# Local folder layout: stories260K/{stories260K.bin,tok512.model} and alpaca/<one .json file>.
set -euo pipefail

source_dir=${1:-}
work=${WORK_DIR:-quickstart}
mkdir -p "$work/download"

if [ -n "$source_dir" ]; then
  model="$source_dir/stories260K/stories260K.bin"
  tokenizer="$source_dir/stories260K/tok512.model"
  alpaca=$(ls "$source_dir"/alpaca/*.json | head -1)
else
  hub=https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K
  model="$work/download/stories260K.bin"
  tokenizer="$work/download/tok512.model"
  [ -f "$model" ] || curl -fL -o "$model" "$hub/stories260K.bin"
  [ -f "$tokenizer" ] || curl -fL -o "$tokenizer" "$hub/tok512.model"
  alpaca=""  # prepare_alpaca.py downloads the 52k records itself
fi

python scripts/convert_checkpoint.py --format llama2c --checkpoint_path "$model" --tokenizer_path "$tokenizer" \
  --output_dir "$work/checkpoints/stories260K"
python scripts/prepare_alpaca.py --checkpoint_dir "$work/checkpoints/stories260K" --destination_dir "$work/data/alpaca" \
  ${alpaca:+--data_file "$alpaca"} --val_size 35 --max_seq_length 512 --skip_bad_records true
# --resume auto: a rerun continues (or re-finishes) the run in out/adapter, which holds one run only
python finetune/adapter.py --config finetune/configs/stories260k_quick.yaml \
  --checkpoint_dir "$work/checkpoints/stories260K" --data_dir "$work/data/alpaca" --out_dir "$work/out/adapter" \
  --resume auto
python generate/adapter.py --checkpoint_dir "$work/checkpoints/stories260K" \
  --adapter_path "$work/out/adapter/adapter.safetensors" --temperature 0 --max_new_tokens 60 \
  --prompt "Give three tips for staying healthy."
