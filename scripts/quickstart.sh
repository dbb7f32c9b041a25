#!/usr/bin/env bash
# The whole job on SmolLM2-135M-Instruct (HuggingFaceTB, Apache 2.0), a small current Llama-architecture chat model:
# convert the checkpoint, prepare the Alpaca records, fine-tune an adapter on the CPU, then answer an instruction
# with it (the base model's answer first, for comparison).
#
#   bash scripts/quickstart.sh                 # fetches the model from the Hugging Face Hub, the Alpaca data from GitHub
#   bash scripts/quickstart.sh ../shared/data  # or takes them from a local folder
#
# Local folder layout: smollm2_135m_instruct/<the model as .gguf> and alpaca/<one Alpaca .json file>.
# Rerunning continues where the last run stopped (--resume auto); WORK_DIR (default: quickstart) holds everything.
set -euo pipefail

source_dir=${1:-}
work=${WORK_DIR:-quickstart}
checkpoint="$work/checkpoints/smollm2-135m-instruct"
instruction="Give three tips for staying healthy."

if [ -n "$source_dir" ]; then
  gguf=$(ls "$source_dir"/smollm2_135m_instruct/*.gguf | head -1)
  python scripts/convert_checkpoint.py --format gguf --checkpoint_path "$gguf" --output_dir "$checkpoint"
  alpaca=$(ls "$source_dir"/alpaca/*.json | head -1)
else
  python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct --output_dir "$work/download/SmolLM2-135M-Instruct"
  python scripts/convert_checkpoint.py --format hf --checkpoint_path "$work/download/SmolLM2-135M-Instruct" \
    --output_dir "$checkpoint"
  alpaca=""  # prepare_alpaca.py downloads the 52k records itself
fi

python scripts/prepare_alpaca.py --checkpoint_dir "$checkpoint" --destination_dir "$work/data/alpaca" \
  ${alpaca:+--data_file "$alpaca"} --val_size 35 --max_seq_length 128 --skip_bad_records true
python finetune/adapter.py --config finetune/configs/smollm2_quick.yaml --resume auto \
  --checkpoint_dir "$checkpoint" --data_dir "$work/data/alpaca" --out_dir "$work/out/adapter"
echo "--- the base model, in the same Alpaca prompt:"
python generate/base.py --checkpoint_dir "$checkpoint" --prompt_style alpaca --temperature 0 --max_new_tokens 80 \
  --prompt "$instruction"
echo "--- with the adapter:"
python generate/adapter.py --checkpoint_dir "$checkpoint" --adapter_path "$work/out/adapter/adapter.safetensors" \
  --temperature 0 --max_new_tokens 80 --prompt "$instruction"
