"""Bad input to every command-line tool: each row runs a script's command line and expects its exact exit status,
its error line, and no traceback.

A user error exits with 1 and prints one line, ``error: <what> ... <what to do>``, as the last line of stderr (before
it may stand progress bars and Lightning's info lines, never another error; a run of two processes prints it once).
A command line that jsonargparse cannot parse exits with 2 and says why on its ``error:`` line. Files that carry code
are refused without running it: the pickles below (also a distributed checkpoint's ``.metadata``) would create a
marker file if they were ever unpickled unsafely.

The real 260K TinyStories checkpoint and a few Alpaca records are prepared once. Most rows run the script as
``__main__`` in this process (its real command line, without a new interpreter's seconds of start-up); the rows marked
``own_process``, at least one per script, start ``python script ...`` in parallel: the wiring of each script as a
user runs it, and the runs that ask for several devices (whose launcher starts copies of the command line).
"""

import json
import os
import pickle
import re
import runpy
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import ROOT, another_sentencepiece_model, run_script, run_script_in_this_process, shared_file
from lit_adapter.adapter import AdapterGPT, adapter_state_dict
from lit_adapter.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, load_model, open_checkpoint, read_safetensors_metadata,
                                    save_adapter)
from lit_adapter.cli import run_cli
from lit_adapter.config import Config
from lit_adapter.errors import UserError, message_line, one_line
from lit_adapter.train.lightning_cli import AdapterCLI
from lit_adapter.train.lightning_cli import main as trainer_main

TIMEOUT = 120


@dataclass(frozen=True)
class Row:
    id: str
    script: str
    args: tuple[str, ...]
    exit_code: int
    message: str
    """A regex matched at the start of the error line; ``{name}`` stands for the (escaped) path of asset ``name``."""
    without_gpu: bool = False
    """Only where no CUDA GPU is visible."""
    own_process: bool = False
    """Run as ``python script ...`` in a new process, not in this one."""


def convert(*args: str) -> tuple[str, tuple[str, ...]]:
    return "scripts/convert_checkpoint.py", ("--format", "llama2c", "--output_dir", "{out}", *args)


def gguf(path: str) -> tuple[str, tuple[str, ...]]:
    return "scripts/convert_checkpoint.py", ("--format", "gguf", "--checkpoint_path", path, "--output_dir", "{out}")


def write_gguf(path: Path, arch: str = "llama", vocabulary: str = "gpt2", tensor_type: str = "F32",
               metadata: Optional[dict] = None) -> Path:
    """A tiny GGUF file: llama-like metadata, a 4-token byte-level vocabulary and one tensor of ``tensor_type``;
    ``metadata`` replaces or adds values (key -> value; non-negative ints are written as uint32)."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    values = {f"{arch}.block_count": 1, f"{arch}.context_length": 16, f"{arch}.embedding_length": 8,
              f"{arch}.feed_forward_length": 16, f"{arch}.attention.head_count": 2,
              f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.model": vocabulary,
              "tokenizer.ggml.tokens": ["a", "b", "ab", "<|end|>"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 3, **(metadata or {})}
    writer = GGUFWriter(str(path), arch)
    for key, value in values.items():
        unsigned = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        writer.add_key_value(key, value, GGUFValueType.UINT32 if unsigned else GGUFValueType.get_type(value))
    kind = GGMLQuantizationType[tensor_type]
    data = torch.zeros(4, 8) if kind == GGMLQuantizationType.F32 else torch.zeros(4, 18, dtype=torch.uint8)
    writer.add_tensor("blk.0.attn_q.weight", data.numpy(), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf(path: str) -> tuple[str, tuple[str, ...]]:
    return "scripts/convert_checkpoint.py", ("--format", "hf", "--checkpoint_path", path, "--output_dir", "{out}")


def prepare(*args: str) -> tuple[str, tuple[str, ...]]:
    return "scripts/prepare_alpaca.py", ("--checkpoint_dir", "{ckpt}", "--destination_dir", "{out}",
                                         "--data_file", "{records}", "--val_size", "2", *args)


def finetune(*args: str) -> tuple[str, tuple[str, ...]]:
    return "finetune/adapter.py", ("--checkpoint_dir", "{ckpt}", "--data_dir", "{data}", "--out_dir", "{out}",
                                   "--accelerator", "cpu", "--train.max_steps", "2", "--train.global_batch_size", "8",
                                   "--train.micro_batch_size", "4", *args)


def trainer(*args: str) -> tuple[str, tuple[str, ...]]:
    return "finetune/adapter_trainer.py", (
        "--model.checkpoint_dir", "{ckpt}", "--data.data_dir", "{data}", "--trainer.default_root_dir", "{out}",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--model.train.max_steps", "2",
        "--model.train.global_batch_size", "8", "--model.train.micro_batch_size", "4", *args)


def generate(*args: str) -> tuple[str, tuple[str, ...]]:
    return "generate/base.py", ("--checkpoint_dir", "{ckpt}", "--max_new_tokens", "5", *args)


def generate_adapter(*args: str) -> tuple[str, tuple[str, ...]]:
    return "generate/adapter.py", ("--checkpoint_dir", "{ckpt}", "--max_new_tokens", "5", *args)


def extract(*args: str) -> tuple[str, tuple[str, ...]]:
    return "scripts/extract_adapter.py", args


def row(id: str, command: tuple[str, tuple[str, ...]], exit_code: int, message: str, **kwargs) -> Row:
    return Row(id, *command, exit_code, message, **kwargs)


QUICK_SCRIPTS = {"scripts/convert_checkpoint.py", "generate/base.py", "generate/adapter.py"}
TRUNCATED = r"is not a readable safetensors file \(truncated or corrupt\?\)"
REFUSED = r"was refused: it holds more than tensors \(loading it would call [\w.]+, which can run code\)"

ROWS = [
    # scripts/convert_checkpoint.py
    row("convert-missing-source", convert("--checkpoint_path", "{tmp}/absent.bin"), 1,
        r"error: {tmp}/absent\.bin not found$"),
    row("convert-truncated-weights", convert("--checkpoint_path", "{truncated_bin}", "--tokenizer_path", "{tok512}"), 1,
        r"error: {truncated_bin}: the header \([-\d, ]+\) needs \d+ bytes but the file has "
        r"500000 \(truncated, or not a llama2.c version-0 export\)$"),
    row("convert-wrong-tokenizer", convert("--checkpoint_path", "{stories_bin}", "--tokenizer_path", "{llama_tok}"), 1,
        r"error: {stories_bin} describes a model of 512 tokens but the tokenizer has 32000: pass the tokenizer"),
    row("convert-tokenizer-json-not-a-tokenizer", convert("--checkpoint_path", "{stories_bin}", "--tokenizer_path",
                                                         "{records}"), 1,
        r"error: {records} is not a Hugging Face tokenizer file \(no JSON object\)$"),
    row("convert-unknown-tokenizer-file", convert("--checkpoint_path", "{stories_bin}", "--tokenizer_path",
                                                  "{random_file}"), 1,
        r"error: {random_file} is not a tokenizer: neither a SentencePiece model nor a Hugging Face tokenizer\.json"),
    row("convert-gguf-other-architecture", gguf("{gguf_gpt2}"), 1,
        r"error: {gguf_gpt2}: GGUF architecture 'gpt2' is not supported \(only 'llama'\)$"),
    row("convert-gguf-unsupported-tensor-type", gguf("{gguf_iq4}"), 1,
        r"error: {gguf_iq4}: tensor blk\.0\.attn_q\.weight has type IQ4_NL, which is not supported \(only F32, "
        r"F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K\); use a GGUF file of another "
        r"quantisation$"),
    row("convert-gguf-unknown-vocabulary", gguf("{gguf_rwkv}"), 1,
        r"error: {gguf_rwkv}: GGUF tokenizer 'rwkv' is not supported \(only 'gpt2', byte-level BPE, or 'llama', "
        r"SentencePiece\); convert the model's Hugging Face folder with --format hf$"),
    row("convert-gguf-not-gguf", gguf("{stories_bin}"), 1,
        r"error: {stories_bin} is not a readable GGUF file \(truncated, or another format\?\)"),
    row("convert-hf-unknown-rope-scaling", ("scripts/convert_checkpoint.py", ("--format", "hf", "--checkpoint_path",
                                                                              "{hf_yarn}", "--output_dir", "{out}")), 1,
        r"error: {hf_yarn}/config\.json: RoPE scaling 'yarn' is not supported \(only 'llama3' or none\)$"),
    row("convert-pickle-with-code", convert("--checkpoint_path", "{evil_pt}", "--tokenizer_path", "{tok512}"), 1,
        r"error: {evil_pt} " + REFUSED),
    row("convert-output-below-a-file", convert("--checkpoint_path", "{stories_bin}", "--output_dir", "{afile}/out"), 1,
        r"error: cannot write to --output_dir {afile}/out: {afile} is a file, not a directory; choose another"),
    row("convert-unknown-format", ("scripts/convert_checkpoint.py", ("--format", "ggml", "--checkpoint_path",
                                                                     "{stories_bin}", "--output_dir", "{out}")), 1,
        r"error: --format: Expected one of meta, hf, llama2c, gguf. Got value: ggml; see --help$", own_process=True),
    # reliability round 3: checkpoints and tokenizers
    row("generate-int4-on-the-cpu", generate("--precision", "int4-base", "--accelerator", "cpu"), 1,
        r"error: --precision int4-base needs an Ampere \(sm80\) or newer GPU for its int4 kernel; this is cpu: use "
        r"int8-base or nf4-base$"),
    row("generate-config-with-a-huge-context", generate("--checkpoint_dir", "{ckpt_huge_context}"), 1,
        r"error: {ckpt_huge_context}/model_config\.yaml is not a valid model config: block_size must be a whole "
        r"number from 1 to 4194304, got 1000000000000$"),
    row("generate-config-with-too-many-layers", generate("--checkpoint_dir", "{ckpt_many_layers}"), 1,
        r"error: {ckpt_many_layers}/model_config\.yaml is not a valid model config: n_layer must be a whole number "
        r"from 1 to 1024, got 100000000$"),
    row("generate-config-with-a-string-for-heads", generate("--checkpoint_dir", "{ckpt_string_heads}"), 1,
        r"error: {ckpt_string_heads}/model_config\.yaml is not a valid model config: n_head must be a whole number "
        r"from 1 to 1024, got '8'$"),
    row("generate-config-with-a-list-for-rope-base", generate("--checkpoint_dir", "{ckpt_list_rope_base}"), 1,
        r"error: {ckpt_list_rope_base}/model_config\.yaml is not a valid model config: rope_base must be a number "
        r"from 1 to 1e\+12, got \[10000\.0\]$"),
    row("generate-tokenizer-smaller-than-model", generate("--checkpoint_dir", "{ckpt_small_tokenizer}"), 1,
        r"error: {ckpt_small_tokenizer}/tokenizer\.model has 300 tokens but the model stories260K knows 512"),
    row("convert-hf-zero-heads", hf("{hf_zero_heads}"), 1,
        r"error: {hf_zero_heads}/config\.json: n_head must be a whole number from 1 to 1024, got 0$"),
    row("convert-hf-negative-context", hf("{hf_negative_context}"), 1,
        r"error: {hf_negative_context}/config\.json: block_size must be a whole number from 1 to 4194304, got -1$"),
    row("convert-hf-rope-scaling-string", hf("{hf_rope_scaling_string}"), 1,
        r"error: {hf_rope_scaling_string}/config\.json: rope_scaling must be a JSON object, got 'linear'$"),
    row("convert-hf-rope-scaling-beside-rope-parameters", hf("{hf_both_ropes}"), 1,
        r"error: {hf_both_ropes}/config\.json: RoPE scaling 'linear' is not supported \(only 'llama3' or none\)$"),
    row("convert-hf-float8-weights", hf("{hf_float8}"), 1,
        r"error: {hf_float8}: tok_embeddings\.weight holds torch\.float8_e4m3fn values \(quantized weights\?\); only "
        r"float32, float16 and bfloat16 weights can be converted: start from the unquantized checkpoint$"),
    row("convert-hf-shard-outside-the-folder", hf("{hf_index_outside}"), 1,
        r"error: {hf_index_outside}/model\.safetensors\.index\.json lists '\.\./hf_elsewhere/model\.safetensors', "
        r"not a file name inside {hf_index_outside}: only the directory's own shards are read"),
    row("convert-hf-shard-at-an-absolute-path", hf("{hf_index_absolute}"), 1,
        r"error: {hf_index_absolute}/model\.safetensors\.index\.json lists '{hf_elsewhere}/model\.safetensors', "
        r"not a file name inside {hf_index_absolute}: only the directory's own shards are read"),
    row("convert-gguf-block-count-beyond-its-tensors", gguf("{gguf_many_blocks}"), 1,
        r"error: {gguf_many_blocks}: llama\.block_count is 1000000000 but the file holds the tensors of 1 blocks "
        r"\(blk\.N\): the file is damaged or its metadata wrong$"),
    row("convert-gguf-eos-beyond-the-vocabulary", gguf("{gguf_eos_beyond}"), 1,
        r"error: {gguf_eos_beyond}: tokenizer\.ggml\.eos_token_id is 99, not a token id of its 4-token vocabulary "
        r"\(damaged file\?\)$"),
    row("convert-gguf-non-utf8-token", gguf("{gguf_non_utf8}"), 1,
        r"error: {gguf_non_utf8}: the GGUF metadata 'tokenizer\.ggml\.tokens' holds text that is not UTF-8 "
        r"\(invalid start byte; damaged file\?\)$"),
    row("convert-gguf-short-token-types", gguf("{gguf_short_types}"), 1,
        r"error: {gguf_short_types}: tokenizer\.ggml\.token_type has 2 entries for the 4 tokens \(damaged file\?\)$"),
    row("convert-gguf-short-scores", gguf("{gguf_short_scores}"), 1,
        r"error: {gguf_short_scores}: tokenizer\.ggml\.scores has 1 entries for the 4 tokens \(damaged file\?\)$"),
    row("convert-gguf-merge-of-unknown-tokens", gguf("{gguf_bad_merges}"), 1,
        r"error: {gguf_bad_merges}: the BPE merges do not fit the vocabulary \(.*Token `zz` out of vocabulary\)$"),
    row("convert-llama3-tokenizer-of-unknown-release", ("scripts/convert_checkpoint.py", (
        "--format", "hf", "--checkpoint_path", "{hf_elsewhere}", "--tokenizer_path", "{lone_tiktoken}",
        "--output_dir", "{out}")), 1,
        r"error: {lone_tiktoken} is Meta's Llama 3 tokenizer, whose special tokens differ between "
        r"Llama 3\.0 and 3\.1 \(and later\), and no params\.json beside it tells which: put the model's params\.json "
        r"there or pass --llama3_release 3\.0 or 3\.1$"),
    # scripts/prepare_alpaca.py
    row("prepare-truncated-json", prepare("--data_file", "{truncated_json}"), 1,
        r"error: {truncated_json} is not valid JSON \(Unterminated string .* in record 1\); is the file truncated\?$",
        own_process=True),
    row("prepare-record-not-an-object", prepare("--data_file", "{list_record_json}"), 1,
        r"error: {list_record_json}: record 1 is a JSON list, expected an object with keys \('instruction', "
        r"'input', 'output'\) \(fix it, or pass --skip_bad_records"),
    row("prepare-empty-dataset", prepare("--data_file", "{empty_json}"), 1,
        r"error: {empty_json} has no usable records \(0 bad ones skipped\)$"),
    row("prepare-val-size-larger-than-data", prepare("--val_size", "50"), 1,
        r"error: val_size=50 does not fit {records}: it has 12 records, so val_size must lie in \[0, 11\]"),
    row("prepare-sequence-longer-than-model", prepare("--max_seq_length", "1024"), 1,
        r"error: --max_seq_length 1024 exceeds the model's block_size 512 \({ckpt}/model_config\.yaml\): "
        r"pass --max_seq_length 512 or less$"),
    # finetune/adapter.py
    row("finetune-micro-batch-larger-than-global", finetune("--train.micro_batch_size", "16"), 1,
        r"error: train\.global_batch_size \(8\) must be a multiple of train\.micro_batch_size x devices "
        r"\(16 x 1 = 16\)$"),
    row("finetune-devices-not-dividing-the-batch", finetune("--devices", "3"), 1,
        r"error: train\.global_batch_size \(8\) must be a multiple of train\.micro_batch_size x devices "
        r"\(4 x 3 = 12\)$", own_process=True),
    row("finetune-data-not-prepared", finetune("--data_dir", "{tmp}/no_data"), 1,
        r"error: {tmp}/no_data/train\.pt not found: run scripts/prepare_alpaca\.py first "
        r"\(with --destination_dir {tmp}/no_data\)$"),
    row("finetune-wrong-resume-path", finetune("--resume", "{tmp}/no_such_step"), 1,
        r"error: --resume {tmp}/no_such_step: no training state found at {tmp}/no_such_step$"),
    row("finetune-no-gpu", finetune("--accelerator", "cuda"), 1,
        r"error: cannot run with --accelerator cuda --devices 1 --strategy auto --precision 32-true: `CUDAAccelerator` "
        r"can not run on your system since the accelerator is not available", without_gpu=True),
    row("finetune-nf4-sharded", finetune("--precision", "nf4-base", "--strategy", "fsdp"), 1,
        r"error: --precision nf4-base does not shard: use --strategy auto or ddp$"),
    # finetune/adapter_trainer.py
    row("trainer-nf4-under-another-precision", trainer("--model.quantized_base", "nf4-base", "--trainer.precision",
                                                        "bf16-mixed"), 1,
        r"error: --model\.quantized_base nf4-base runs under --trainer\.precision bf16-true, not bf16-mixed: leave "
        r"--trainer\.precision out$"),
    row("trainer-wrong-ckpt-path", trainer("--ckpt_path", "{tmp}/no.ckpt"), 1,
        r"error: --ckpt_path {tmp}/no\.ckpt: no such checkpoint file \(pass a \.ckpt from the checkpoints/"),
    # generate/base.py
    row("generate-prompt-longer-than-context", generate("--prompt", "once upon a time " * 200), 1,
        r"error: the prompt is \d+ tokens; with max_new_tokens=5 it exceeds the model's context of 512 tokens$"),
    row("generate-checkpoint-without-config", generate("--checkpoint_dir", "{ckpt_without_config}"), 1,
        r"error: {ckpt_without_config}/model_config\.yaml not found: a checkpoint directory must hold "
        r"model_config\.yaml \(run scripts/convert_checkpoint\.py\)$"),
    row("generate-missing-checkpoint-dir", generate("--checkpoint_dir", "{tmp}/no_checkpoint"), 1,
        r"error: checkpoint directory {tmp}/no_checkpoint not found "
        r"\(create it with scripts/convert_checkpoint\.py\)$"),
    row("generate-truncated-weights", generate("--checkpoint_dir", "{ckpt_truncated}"), 1,
        r"error: {ckpt_truncated}/model\.safetensors " + TRUNCATED),
    row("generate-mismatched-shapes", generate("--checkpoint_dir", "{ckpt_wider}"), 1,
        r"error: {ckpt_wider}/model\.safetensors: blocks\.0\.attn\.proj\.weight has shape \(64, 64\), "
        r"the model expects \(128, 128\)$"),
    row("generate-missing-tokenizer", generate("--checkpoint_dir", "{ckpt_without_tokenizer}"), 1,
        r"error: tokenizer not found: no tokenizer\.json or tokenizer\.model in {ckpt_without_tokenizer} "),
    row("generate-tiktoken-tokenizer", generate("--checkpoint_dir", "{ckpt_tiktoken}"), 1,
        r"error: {ckpt_tiktoken}/tokenizer\.model is Meta's tiktoken tokenizer: convert the checkpoint with "
        r"scripts/convert_checkpoint\.py, which writes it as tokenizer\.json$"),
    row("generate-bad-sampling-options", generate("--top_p", "0"), 1,
        r"error: need temperature >= 0, 0 < top_p <= 1 and top_k >= 1$"),
    row("generate-no-chat-context", generate("--interactive", "true", "--chat_context", "0"), 1,
        r"error: num_samples, batch_size and chat_context must be at least 1$"),
    # generate/adapter.py
    row("adapter-for-another-base", generate_adapter("--adapter_path", "{tiny_adapter}"), 1,
        r"error: {tiny_adapter} was trained for base tiny but the checkpoint is stories260K: n_layer 3 vs 5",
        own_process=True),
    row("adapter-random-file", generate_adapter("--adapter_path", "{random_file}"), 1,
        r"error: {random_file} " + TRUNCATED),
    row("adapter-truncated", generate_adapter("--adapter_path", "{truncated_adapter}"), 1,
        r"error: {truncated_adapter} " + TRUNCATED),
    row("adapter-missing", generate_adapter("--adapter_path", "{tmp}/none.safetensors"), 1,
        r"error: adapter file {tmp}/none\.safetensors not found$"),
    row("adapter-is-a-training-state", generate_adapter("--adapter_path", "{state}"), 1,
        r"error: {state} is not a readable safetensors file but a PyTorch file: for a training state, run "
        r"scripts/extract_adapter\.py --state_path {state}"),
    # scripts/extract_adapter.py
    row("extract-pickle-with-code", extract("--state_path", "{evil_state}"), 1, r"error: {evil_state} " + REFUSED,
        own_process=True),
    row("extract-output-below-a-file", extract("--state_path", "{state}", "--output_path", "{afile}/a.safetensors"), 1,
        r"error: cannot write {afile}/a\.safetensors: {afile} is a file, not a directory; choose another location$"),
    # 1. nothing that is loaded runs code: a distributed checkpoint's .metadata pickle, a .ckpt pickle
    row("trainer-distributed-checkpoint-dir", trainer("--ckpt_path", "{dcp_dir}", "--trainer.strategy", "fsdp"), 1,
        r"error: --ckpt_path {dcp_dir} is a directory \(a distributed checkpoint\?\): only single \.ckpt files are "
        r"read, as tensors"),
    row("trainer-ckpt-pickle-with-code", trainer("--ckpt_path", "{evil_pt}"), 1, r"error: {evil_pt} " + REFUSED),
    row("trainer-ckpt-is-a-fabric-state", trainer("--ckpt_path", "{state}"), 1,
        r"error: --ckpt_path {state} is not a checkpoint of finetune/adapter_trainer\.py \(a training state of "
        r"finetune/adapter\.py resumes with finetune/adapter\.py --resume\)$"),
    # 3. fewer samples than an optimizer step (the plan deals every step's samples to all devices)
    row("finetune-fewer-batches-than-devices", finetune("--data_dir", "{data_one}", "--devices", "2",
                                                        "--train.global_batch_size", "8"), 1,
        r"error: {data_one} has 1 training samples, fewer than one optimizer step of 8 \(--train\.global_batch_size\)",
        own_process=True),
    row("trainer-fewer-batches-than-devices", trainer("--data.data_dir", "{data_one}", "--trainer.devices", "2"), 1,
        r"error: {data_one} has 1 training samples, fewer than one optimizer step of 8 "
        r"\(--model\.train\.global_batch_size\)", own_process=True),
    # 5. a half-written set of prepared files
    row("finetune-half-prepared-data", finetune("--data_dir", "{data_mixed}"), 1,
        r"error: {data_mixed}/train\.pt is not the file that {data_mixed}/prep_config\.yaml describes \(a "
        r"preparation stopped half-way"),
    # 6. one run per folder
    row("finetune-fresh-run-in-a-used-folder", finetune("--out_dir", "{used_out}"), 1,
        r"error: {used_out} already holds the training states of a run \(up to step-000001\): continue it with "
        r"--resume auto"),
    row("finetune-resume-into-another-runs-folder", finetune("--out_dir", "{used_out}", "--resume", "{state}"), 1,
        r"error: {used_out} holds training states of another run than {state} \(step-000001\)"),
    # 7. values that cannot train (those of finetune/adapter.py: tests/train/test_fabric_loop.py, in-process)
    row("convert-odd-head-size", convert("--checkpoint_path", "{odd_heads_bin}", "--tokenizer_path", "{tok512}"), 1,
        r"error: {odd_heads_bin}: the head size n_embd / n_head = 12 / 4 = 3 must be even"),
    row("convert-int8-weights", convert("--checkpoint_path", "{int8_pt}", "--tokenizer_path", "{tok512}"), 1,
        r"error: {int8_pt}: tok_embeddings\.weight holds torch\.int8 values \(quantized weights\?\)"),
    row("convert-float64-weights", convert("--checkpoint_path", "{float64_pt}", "--tokenizer_path", "{tok512}"), 1,
        r"error: {float64_pt}: tok_embeddings\.weight is float64, which the model does not run in: pass --dtype "
        r"float32"),
    row("generate-int8-checkpoint", generate("--checkpoint_dir", "{ckpt_int8}"), 1,
        r"error: {ckpt_int8}/model\.safetensors: embed\.weight is stored as I8, not float32"),
    # 8. non-finite values
    row("adapter-with-nan-values", generate_adapter("--adapter_path", "{nan_adapter}"), 1,
        r"error: {nan_adapter}: blocks\.\d\.attn\.adapter_\w+ holds nan or inf values"),
    # 9. metadata that would make the loader allocate
    row("adapter-huge-declared-prompt-length", generate_adapter("--adapter_path", "{huge_adapter}"), 1,
        r"error: {huge_adapter}: blocks\.\d\.attn\.adapter_prompt has shape \(10, 64\), the model expects "
        r"\(1000000000000, 64\)$"),
    # 11. one line instead of a traceback
    row("generate-config-with-yaml-tag", generate("--checkpoint_dir", "{ckpt_tagged}"), 1,
        r"error: {ckpt_tagged}/model_config\.yaml is not a readable plain-YAML file \(could not determine a "
        r"constructor for the tag"),
    row("generate-empty-config", generate("--checkpoint_dir", "{ckpt_empty_config}"), 1,
        r"error: {ckpt_empty_config}/model_config\.yaml is empty, expected a mapping"),
    row("finetune-prep-config-with-yaml-tag", finetune("--data_dir", "{data_tagged}"), 1,
        r"error: {data_tagged}/prep_config\.yaml is not a readable plain-YAML file"),
    row("prepare-config-with-yaml-tag", prepare("--checkpoint_dir", "{ckpt_tagged}"), 1,
        r"error: {ckpt_tagged}/model_config\.yaml is not a readable plain-YAML file"),
    row("convert-directory-for-a-file", convert("--checkpoint_path", "{tmp}", "--tokenizer_path", "{tok512}"), 1,
        r"error: {tmp} is a directory, expected a file \(llama2\.c checkpoints are a \.bin or \.pt file\)$"),
    row("prepare-directory-for-data-file", prepare("--data_file", "{tmp}"), 1,
        r"error: cannot read {tmp} as UTF-8 text"),
    row("generate-file-for-the-checkpoint-dir", generate("--checkpoint_dir", "{afile}"), 1,
        r"error: checkpoint directory {afile} is a file, not a directory \(create it with"),
    row("adapter-directory-for-a-file", generate_adapter("--adapter_path", "{tmp}"), 1,
        r"error: adapter file {tmp} is a directory, expected a file$"),
    row("generate-non-utf8-prompt", generate("--prompt", "caf\udce9"), 1,
        r"error: the text is not valid UTF-8 \(at character 3\): pass UTF-8 text$", own_process=True),
    row("finetune-resume-from-an-adapter-file", finetune("--resume", "{tiny_adapter}"), 1,
        r"error: --resume {tiny_adapter}: {tiny_adapter} is not a training state \(pass a step-NNNNNN directory"),
    row("finetune-resume-from-another-pt", finetune("--resume", "{not_a_state}"), 1,
        r"error: {not_a_state} is not a training state of finetune/adapter\.py \(it lacks \['adapter'"),
    row("generate-tokenizer-larger-than-model", generate("--checkpoint_dir", "{ckpt_llama_tok}"), 1,
        r"error: {ckpt_llama_tok}/tokenizer\.model has 32000 tokens but the model stories260K knows 512"),
    row("finetune-tokenizer-larger-than-model", finetune("--checkpoint_dir", "{ckpt_llama_tok}"), 1,
        r"error: {ckpt_llama_tok}/tokenizer\.model has 32000 tokens but the model stories260K knows 512"),
    row("prepare-json-lines-with-a-broken-line", prepare("--data_file", "{jsonl}"), 1,
        r"error: {jsonl} line 2 is not valid JSON \(Expecting property name enclosed in double quotes at column 2\); "
        r"JSON Lines hold one record per line$"),
    # reliability round 3: files nested deeper than Python's stack (or, in jsonargparse's C reader, a crash)
    row("prepare-json-nested-too-deep", prepare("--data_file", "{deep_json}"), 1,
        r"error: {deep_json} is not valid JSON: nested deeper than can be read \(a damaged file\?\)$"),
    row("prepare-jsonl-nested-too-deep", prepare("--data_file", "{deep_jsonl}"), 1,
        r"error: {deep_jsonl} line 1 is not valid JSON: nested deeper than can be read \(a damaged file\?\)$"),
    row("generate-model-config-nested-too-deep", generate("--checkpoint_dir", "{ckpt_deep_yaml}"), 1,
        r"error: {ckpt_deep_yaml}/model_config\.yaml is not a readable plain-YAML file: nested deeper than can be "
        r"read \(a damaged file\?\)$"),
    row("convert-hf-config-nested-too-deep", hf("{hf_deep_config}"), 1,
        r"error: {hf_deep_config}/config\.json is not valid JSON: nested deeper than can be read \(a damaged "
        r"file\?\)$"),
    row("finetune-config-file-nested-too-deep", finetune("--config", "{deep_config_yaml}"), 1,
        r"error: Problems parsing config: nested deeper than can be read \(a damaged file\?\); see --help$",
        own_process=True),  # jsonargparse's C YAML reader crashed the process (a segmentation fault)
    # reliability round 3: generation and prompts
    row("generate-requests-not-utf8", generate("--requests_path", "{requests_latin1}"), 1,
        r"error: {requests_latin1} is not UTF-8 text \(byte 15\): save it as UTF-8$"),
    row("generate-requests-nested-too-deep", generate("--requests_path", "{requests_deep}"), 1,
        r"error: {requests_deep} line 1 is not JSON: nested deeper than can be read \(a damaged file\?\)$"),
    row("generate-output-path-is-a-directory", generate("--requests_path", "{requests}", "--output_path", "{tmp}"), 1,
        r"error: --output_path {tmp} is a directory: name a file in it$"),
    row("generate-output-path-without-requests", generate("--output_path", "{tmp}/answers.jsonl"), 1,
        r"error: --output_path is where the answers to --requests_path go: give --requests_path too$"),
    row("generate-empty-prompt-without-bos", generate("--checkpoint_dir", "{ckpt_without_bos}", "--prompt", ""), 1,
        r"error: the prompt is empty and the model has no BOS token to begin with: give a prompt$"),
    row("generate-negative-seed", generate("--seed", "-1"), 1,
        r"error: --seed must be a whole number from 0 to 4294967295, got -1$"),
    row("prepare-negative-seed", prepare("--seed", "-1"), 1,
        r"error: --seed must be a whole number from 0 to 4294967295, got -1$"),
    row("finetune-negative-seed", finetune("--seed", "-1"), 1,
        r"error: --seed must be a whole number from 0 to 4294967295, got -1$"),
    row("finetune-negative-sample-length", finetune("--eval.max_new_tokens", "-1"), 1,
        r"error: eval\.max_new_tokens must be zero \(no sample answer\) or more, got -1$"),
    row("trainer-negative-sample-length", trainer("--model.eval.max_new_tokens", "-1"), 1,
        r"error: model\.eval\.max_new_tokens must be zero \(no sample answer\) or more, got -1$"),
    row("trainer-negative-seed", trainer("--seed_everything", "-1"), 1,
        r"error: --seed_everything must be a whole number from 0 to 4294967295, got -1$"),
    row("generate-chat-template-not-utf8", generate("--checkpoint_dir", "{template_latin1}", "--prompt_style", "chat"),
        1, r"error: {template_latin1}/chat_template\.jinja is not UTF-8 text \(byte 4\): save it as UTF-8$"),
    row("generate-chat-template-loops-for-ever", generate("--checkpoint_dir", "{template_loops}", "--prompt_style",
                                                          "chat"), 1,
        r"error: the chat template of {template_loops}/chat_template\.jinja loops more than 1000000 times: it "
        r"cannot be a chat prompt$"),
    row("generate-chat-template-writes-too-much", generate("--checkpoint_dir", "{template_floods}", "--prompt_style",
                                                           "chat"), 1,
        r"error: the chat template of {template_floods}/chat_template\.jinja writes more than 16777216 characters"),
    row("generate-chat-template-multiplies-a-string", generate("--checkpoint_dir", "{template_multiplies}",
                                                               "--prompt_style", "chat"), 1,
        r"error: the chat template of {template_multiplies}/chat_template\.jinja makes a sequence of 60000000 items: "
        r"refused$"),
    row("generate-chat-template-pads-a-string", generate("--checkpoint_dir", "{template_pads}", "--prompt_style",
                                                          "chat"), 1,
        r"error: the chat template of {template_pads}/chat_template\.jinja pads or formats to 1000000000 characters: "
        r"refused$"),
    row("generate-chat-template-formats-a-huge-field", generate("--checkpoint_dir", "{template_formats}",
                                                                "--prompt_style", "chat"), 1,
        r"error: the chat template of {template_formats}/chat_template\.jinja pads or formats to 1000000000 "
        r"characters: refused$"),
    row("generate-chat-template-replaces-into-a-huge-text", generate("--checkpoint_dir", "{template_replaces}",
                                                                     "--prompt_style", "chat"), 1,
        r"error: the chat template of {template_replaces}/chat_template\.jinja makes a text of 100000000 "
        r"characters: refused$"),
    row("generate-chat-template-recurses", generate("--checkpoint_dir", "{template_recurses}", "--prompt_style",
                                                    "chat"), 1,
        r"error: the chat template of {template_recurses}/chat_template\.jinja recurses or grows without bound$"),
    row("generate-chat-template-is-a-number", generate("--checkpoint_dir", "{template_number}", "--prompt_style",
                                                       "chat"), 1,
        r"error: the chat template of {template_number}/tokenizer_config\.json is not text \(a int\): fix or "
        r"remove it$"),
    row("generate-chat-template-list-of-strings", generate("--checkpoint_dir", "{template_list}", "--prompt_style",
                                                           "chat"), 1,
        r"error: the chat template of {template_list}/tokenizer_config\.json is not text \(a list\): fix or "
        r"remove it$"),
    row("adapter-with-extreme-values", generate_adapter("--adapter_path", "{extreme_adapter}"), 1,
        r"error: the model's next-token scores are not finite \(inf or nan\): an adapter holds values far beyond "
        r"trained ones"),
    row("adapter-of-another-base-of-the-same-shape", generate_adapter("--checkpoint_dir", "{ckpt_other_weights}",
                                                                      "--adapter_path", "{fingerprinted_adapter}"), 1,
        r"error: {fingerprinted_adapter} was trained on another base than {ckpt_other_weights}: weights fingerprint "
        r"[0-9a-f]{{16}} vs [0-9a-f]{{16}} \(same shape, other weights or tokenizer\): use the base it was trained on, "
        r"or pass --allow_other_base true to use it anyway$"),
    # 12. the Trainer route
    row("trainer-ckpt-last-without-checkpoints", trainer("--ckpt_path", "last"), 1,
        r"error: --ckpt_path last: no checkpoint \(\.ckpt\) below {tmp}/out/trainer-ckpt-last-without-checkpoints"),
    # reliability round 3: training and data
    row("trainer-max-steps-0", trainer("--trainer.max_steps", "0"), 1,
        r"error: --trainer\.max_steps 0 trains nothing \(and writes no adapter\): give a positive value, or leave it "
        r"out$"),
    row("trainer-max-epochs-0", trainer("--trainer.max_epochs", "0"), 1,
        r"error: --trainer\.max_epochs 0 trains nothing \(and writes no adapter\)"),
    row("extract-output-is-the-state", extract("--state_path", "{own_state}", "--output_path", "{own_state}"), 1,
        r"error: --output_path {own_state} names the input {own_state}: writing it would destroy that input; choose "
        r"another path$"),
    row("extract-output-links-to-the-state", extract("--state_path", "{own_state}", "--output_path", "{state_link}"),
        1, r"error: --output_path {state_link} names the input {own_state}: writing it would destroy that input"),
    row("extract-output-is-a-directory", extract("--state_path", "{own_state}", "--output_path", "{tmp}"), 1,
        r"error: cannot write {tmp}: it is a directory; name a file$"),
    row("trainer-validate-without-validation-samples",
        ("finetune/adapter_trainer.py", ("validate", *trainer("--data.data_dir", "{data_no_val}")[1])), 1,
        r"error: {data_no_val} has no validation samples \(prepared with --val_size 0\): there is nothing to "
        r"validate$"),
    row("finetune-unknown-recorded-prompt-style", finetune("--data_dir", "{data_style_unknown}"), 1,
        r"error: {data_style_unknown}/prep_config\.yaml records the prompt style 'sonnet', which this version does not "
        r"know \(it knows plain, alpaca, chat\): prepare the data again with scripts/prepare_alpaca\.py$"),
    row("trainer-recorded-prompt-style-not-a-name", trainer("--data.data_dir", "{data_style_list}"), 1,
        r"error: {data_style_list}/prep_config\.yaml records the prompt style \['alpaca'\], which this version does "
        r"not know"),
    row("finetune-data-of-another-tokenizer", finetune("--data_dir", "{data_other_tokenizer}"), 1,
        r"error: {data_other_tokenizer} was prepared with the tokenizer {other_tokenizer} \(sha256 [0-9a-f]{{12}}\), "
        r"not the model's {ckpt}/tokenizer\.model \(sha256 [0-9a-f]{{12}}\): its token ids would stand for other "
        r"text\. Run scripts/prepare_alpaca\.py with this --checkpoint_dir, or pass --allow_other_tokenizer true if "
        r"both tokenize alike$"),
    row("trainer-data-of-another-tokenizer", trainer("--data.data_dir", "{data_other_tokenizer}"), 1,
        r"error: {data_other_tokenizer} was prepared with the tokenizer {other_tokenizer} .* or pass "
        r"--data\.allow_other_tokenizer true if both tokenize alike$", own_process=True),
]


class WritesAFile:
    """Unpickled unsafely, this creates ``path``: proof that a loader ran code from a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Every file the rows name: the real checkpoint and data, and broken copies of them."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    stories_bin, tok512 = shared_file("stories260K/stories260K.bin"), shared_file("stories260K/tok512.model")
    llama_tok, alpaca = shared_file("llama_tokenizer/tokenizer.model"), shared_file("alpaca/alpaca_data_first335.json")
    a = {"tmp": tmp, "stories_bin": stories_bin, "tok512": tok512, "llama_tok": llama_tok, "afile": tmp / "afile",
         "marker": tmp / "code-was-run"}
    a["afile"].write_text("a regular file, where a directory is expected\n")

    ckpt = a["ckpt"] = tmp / "stories260K"
    runpy.run_path(str(ROOT / "scripts" / "convert_checkpoint.py"))["convert_checkpoint"]("llama2c", stories_bin, ckpt)
    records = json.loads(alpaca.read_text())
    a["records"] = tmp / "records.json"
    a["records"].write_text(json.dumps(records[:12]))
    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_alpaca.py"))["main"]
    a["data"] = tmp / "data"
    prepare(destination_dir=a["data"], checkpoint_dir=ckpt, data_file=a["records"], val_size=2)

    for name, drop in (("ckpt_without_config", CONFIG_FILE), ("ckpt_without_tokenizer", "tokenizer.model")):
        shutil.copytree(ckpt, tmp / name)
        (tmp / name / drop).unlink()
        a[name] = tmp / name
    a["ckpt_truncated"], a["ckpt_wider"] = tmp / "ckpt_truncated", tmp / "ckpt_wider"
    shutil.copytree(ckpt, a["ckpt_truncated"])
    weights = (ckpt / "model.safetensors").read_bytes()
    (a["ckpt_truncated"] / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    shutil.copytree(ckpt, a["ckpt_wider"])
    config = yaml.safe_load((ckpt / CONFIG_FILE).read_text())
    (a["ckpt_wider"] / CONFIG_FILE).write_text(yaml.safe_dump({**config, "n_embd": 128}))

    a["ckpt_tiktoken"] = tmp / "ckpt_tiktoken"
    shutil.copytree(ckpt, a["ckpt_tiktoken"])
    shutil.copyfile(shared_file("llama3_tokenizer/tokenizer.model"), a["ckpt_tiktoken"] / "tokenizer.model")
    a["gguf_gpt2"] = write_gguf(tmp / "gpt2.gguf", arch="gpt2")
    a["gguf_iq4"] = write_gguf(tmp / "iq4.gguf", tensor_type="IQ4_NL")
    a["gguf_rwkv"] = write_gguf(tmp / "rwkv.gguf", vocabulary="rwkv")
    a["hf_yarn"] = tmp / "hf_yarn"
    a["hf_yarn"].mkdir()
    shutil.copyfile(tok512, a["hf_yarn"] / "tokenizer.model")
    hf_config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 5,
                 "intermediate_size": 172, "vocab_size": 512, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    (a["hf_yarn"] / "config.json").write_text(json.dumps(hf_config))
    a["truncated_bin"] = tmp / "stories260K.bin"
    a["truncated_bin"].write_bytes(stories_bin.read_bytes()[:500_000])
    a["evil_pt"], a["evil_state"] = tmp / "evil.pt", tmp / "evil_state.pt"
    torch.save({"model": WritesAFile(a["marker"]), "model_args": {}}, a["evil_pt"])
    torch.save({"adapter": WritesAFile(a["marker"]), "model_config": {}}, a["evil_state"])
    files = {"truncated_json": '[{"instruction": "a", "input": "", "output": "b"},\n{"instruction": "c", "inp',
             "list_record_json": '[{"instruction": "a", "output": "b"}, ["c", "d"]]', "empty_json": "[]"}
    for name, text in files.items():
        a[name] = tmp / f"{name}.json"
        a[name].write_text(text)

    model = load_model(ckpt, adapter=True)
    a["state"] = tmp / "step-000001" / "training_state.pt"
    a["state"].parent.mkdir()
    torch.save({"adapter": adapter_state_dict(model), "model_config": asdict(model.config)}, a["state"])
    tiny = Config.from_name("tiny")
    a["tiny_adapter"] = tmp / "tiny_adapter.safetensors"
    save_adapter(a["tiny_adapter"], AdapterGPT(tiny), tiny)
    good_adapter = tmp / "adapter.safetensors"
    save_adapter(good_adapter, model, model.config)
    a["truncated_adapter"] = tmp / "truncated_adapter.safetensors"
    a["truncated_adapter"].write_bytes(good_adapter.read_bytes()[:-100])
    add_reliability_assets(a, records)
    add_training_round3_assets(a, records)
    add_checkpoint_metadata_assets(a, records)
    add_generation_round3_assets(a)
    add_deep_nesting_assets(a)
    a["random_file"] = tmp / "random.safetensors"
    a["random_file"].write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                               generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    return a


def add_reliability_assets(a: dict[str, Path], records: list[dict]) -> None:
    """Files for the rows of the reliability classes: code-carrying, mixed, damaged and odd inputs."""
    tmp, ckpt = a["tmp"], a["ckpt"]
    a["dcp_dir"] = tmp / "distributed.ckpt"
    a["dcp_dir"].mkdir()
    (a["dcp_dir"] / ".metadata").write_bytes(pickle.dumps(WritesAFile(a["marker"])))
    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_alpaca.py"))["main"]
    (tmp / "three.json").write_text(json.dumps(records[:3]))
    a["data_one"] = tmp / "data_one"
    prepare(destination_dir=a["data_one"], checkpoint_dir=ckpt, data_file=tmp / "three.json", val_size=2)
    a["data_mixed"], a["data_tagged"] = tmp / "data_mixed", tmp / "data_tagged"
    shutil.copytree(a["data"], a["data_mixed"])
    shutil.copyfile(a["data_one"] / "train.pt", a["data_mixed"] / "train.pt")
    shutil.copytree(a["data"], a["data_tagged"])
    prep_config = a["data_tagged"] / "prep_config.yaml"
    prep_config.write_text("source: !!python/object/apply:os.system ['true']\n" + prep_config.read_text())
    a["used_out"] = tmp / "used_out"
    (a["used_out"] / "step-000001").mkdir(parents=True)
    shutil.copyfile(a["state"], a["used_out"] / "step-000001" / "training_state.pt")
    (a["used_out"] / "step-000001" / "hyperparameters.yaml").write_text("run_id: another\n")

    a["odd_heads_bin"] = tmp / "odd_heads.bin"
    a["odd_heads_bin"].write_bytes(struct.pack("7i", 12, 32, 1, 4, 4, 512, 16) + bytes(4096))
    llama2c = torch.load(shared_file("tinystories_llama2c_500iter/ckpt.pt"), map_location="cpu", weights_only=True)
    for dtype in (torch.int8, torch.float64):
        a[f"{dtype}_pt".removeprefix("torch.")] = path = tmp / f"{dtype}.pt"
        weights = {k: v.to(dtype) for k, v in llama2c["model"].items()}
        torch.save({"model": weights, "model_args": llama2c["model_args"]}, path)
    for name, change in (("ckpt_int8", None), ("ckpt_tagged", "n_layer: !!python/object/apply:os.system ['true']\n"),
                         ("ckpt_empty_config", ""), ("ckpt_llama_tok", None)):
        a[name] = tmp / name
        shutil.copytree(ckpt, a[name])
        if change is not None:
            (a[name] / CONFIG_FILE).write_text(change)
    weights = load_file(ckpt / "model.safetensors")
    save_file({**weights, "embed.weight": weights["embed.weight"].to(torch.int8)}, a["ckpt_int8"] / "model.safetensors")
    shutil.copyfile(a["llama_tok"], a["ckpt_llama_tok"] / "tokenizer.model")

    model = load_model(ckpt, adapter=True)
    a["nan_adapter"], a["huge_adapter"] = tmp / "nan_adapter.safetensors", tmp / "huge_adapter.safetensors"
    save_adapter(a["nan_adapter"], None, model.config,
                 state_dict={k: torch.full_like(v, float("nan")) for k, v in adapter_state_dict(model).items()})
    save_adapter(a["huge_adapter"], model, model.config)
    huge = {**read_safetensors_metadata(a["huge_adapter"]), "adapter": json.dumps(
        {"adapter_prompt_length": 10**12, "adapter_start_layer": model.config.adapter_start_layer})}
    save_file(load_file(a["huge_adapter"]), a["huge_adapter"], metadata=huge)
    a["not_a_state"] = tmp / "not_a_state.pt"
    torch.save({"weights": torch.zeros(2)}, a["not_a_state"])
    a["jsonl"] = tmp / "records.jsonl"
    a["jsonl"].write_text(json.dumps(records[0]) + "\n{oops}\n")


def add_training_round3_assets(a: dict[str, Path], records: list[dict]) -> None:
    """Files for the rows of reliability round 3 (training and data): a training state of its own and a link to it,
    a prepared set without validation samples, sets that record a prompt style this version does not know, and one
    prepared with another tokenizer of the same vocabulary size."""
    tmp = a["tmp"]
    a["own_state"] = tmp / "round3" / "step-000001" / "training_state.pt"
    a["own_state"].parent.mkdir(parents=True)
    shutil.copyfile(a["state"], a["own_state"])
    a["state_link"] = tmp / "round3" / "link.pt"
    a["state_link"].symlink_to(a["own_state"])
    prepare = runpy.run_path(str(ROOT / "scripts" / "prepare_alpaca.py"))["main"]
    a["data_no_val"] = tmp / "data_no_val"
    prepare(destination_dir=a["data_no_val"], checkpoint_dir=a["ckpt"], data_file=a["records"], val_size=0)
    for name, style in (("data_style_unknown", "sonnet"), ("data_style_list", ["alpaca"])):
        a[name] = tmp / name
        shutil.copytree(a["data"], a[name])
        prep_config = yaml.safe_load((a[name] / "prep_config.yaml").read_text())
        (a[name] / "prep_config.yaml").write_text(yaml.safe_dump({**prep_config, "prompt_style": style}))
    a["other_tokenizer"] = another_sentencepiece_model(a["ckpt"] / "tokenizer.model", tmp / "other_tokenizer.model")
    a["data_other_tokenizer"] = tmp / "data_other_tokenizer"
    prepare(destination_dir=a["data_other_tokenizer"], checkpoint_dir=a["ckpt"], tokenizer_path=a["other_tokenizer"],
            data_file=a["records"], val_size=2)


HF_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4,
             "num_hidden_layers": 1, "intermediate_size": 172, "vocab_size": 512, "max_position_embeddings": 512,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
"""A one-layer Hugging Face Llama of the 260K TinyStories model's shape (key/value width 4 x 64 / 8 = 32)."""


def hf_weights(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights of ``HF_CONFIG``'s model under Hugging Face's names."""
    C, V, hidden, kv = HF_CONFIG["hidden_size"], HF_CONFIG["vocab_size"], HF_CONFIG["intermediate_size"], 32
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    layer = {"input_layernorm": (C,), "self_attn.q_proj": (C, C), "self_attn.k_proj": (kv, C),
             "self_attn.v_proj": (kv, C), "self_attn.o_proj": (C, C), "post_attention_layernorm": (C,),
             "mlp.gate_proj": (hidden, C), "mlp.up_proj": (hidden, C), "mlp.down_proj": (C, hidden)}
    shapes.update({f"model.layers.0.{name}.weight": shape for name, shape in layer.items()})
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}


def write_hf_folder(path: Path, tokenizer: Path, changes: Optional[dict] = None, dtype: torch.dtype = torch.float32,
                    index: Optional[dict] = None) -> Path:
    """A Hugging Face folder: ``HF_CONFIG`` with ``changes``, the ``tokenizer`` and random weights of ``dtype`` in
    model.safetensors, or, given an ``index`` (a weight_map), that index instead of the weights."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**HF_CONFIG, **(changes or {})}))
    shutil.copyfile(tokenizer, path / "tokenizer.model")
    if index is None:
        save_file(hf_weights(dtype), path / "model.safetensors")
    else:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return path


def add_checkpoint_metadata_assets(a: dict[str, Path], records: list[dict]) -> None:
    """Files for the rows of round 3's checkpoint and tokenizer classes: metadata out of range or of the wrong type,
    shard indexes that point outside their folder, quantized weights, damaged GGUF vocabularies, a tokenizer smaller
    than its model and a Llama 3 tokenizer whose release nothing tells."""
    from sentencepiece import sentencepiece_model_pb2

    tmp, ckpt = a["tmp"], a["ckpt"]
    config = yaml.safe_load((ckpt / CONFIG_FILE).read_text())
    for name, change in (("ckpt_huge_context", {"block_size": 10**12}), ("ckpt_many_layers", {"n_layer": 10**8}),
                         ("ckpt_string_heads", {"n_head": "8"}), ("ckpt_list_rope_base", {"rope_base": [10000.0]}),
                         ("ckpt_small_tokenizer", {})):
        a[name] = tmp / name
        shutil.copytree(ckpt, a[name])
        (a[name] / CONFIG_FILE).write_text(yaml.safe_dump({**config, **change}))
    small = sentencepiece_model_pb2.ModelProto.FromString(a["tok512"].read_bytes())
    del small.pieces[300:]
    small.trainer_spec.vocab_size = 300
    (a["ckpt_small_tokenizer"] / "tokenizer.model").write_bytes(small.SerializeToString())

    for name, changes in (("hf_zero_heads", {"num_attention_heads": 0}),
                          ("hf_negative_context", {"max_position_embeddings": -1}),
                          ("hf_rope_scaling_string", {"rope_scaling": "linear"}),
                          ("hf_both_ropes", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                                             "rope_scaling": {"rope_type": "linear", "factor": 2.0}})):
        a[name] = write_hf_folder(tmp / name, a["tok512"], changes)
    a["hf_float8"] = write_hf_folder(tmp / "hf_float8", a["tok512"], {"quantization_config": {"quant_method": "fp8"}},
                                     dtype=torch.float8_e4m3fn)
    a["hf_elsewhere"] = write_hf_folder(tmp / "hf_elsewhere", a["tok512"])
    names = hf_weights(torch.float32)
    for name, target in (("hf_index_outside", "../hf_elsewhere/model.safetensors"),
                         ("hf_index_absolute", str(a["hf_elsewhere"] / "model.safetensors"))):
        a[name] = write_hf_folder(tmp / name, a["tok512"], index=dict.fromkeys(names, target))

    for name, vocabulary, metadata in (
            ("gguf_many_blocks", "gpt2", {"llama.block_count": 10**9}),
            ("gguf_eos_beyond", "gpt2", {"tokenizer.ggml.eos_token_id": 99}),
            ("gguf_non_utf8", "gpt2", {"tokenizer.ggml.tokens": ["a", b"\xff", "ab", "<|end|>"]}),
            ("gguf_short_types", "gpt2", {"tokenizer.ggml.token_type": [1, 1]}),
            ("gguf_short_scores", "llama", {"tokenizer.ggml.scores": [0.0]}),
            ("gguf_bad_merges", "gpt2", {"tokenizer.ggml.merges": ["a zz"]})):
        a[name] = write_gguf(tmp / f"{name}.gguf", vocabulary=vocabulary, metadata=metadata)
    a["lone_tiktoken"] = tmp / "lone_tiktoken" / "tokenizer.model"
    a["lone_tiktoken"].parent.mkdir()
    a["lone_tiktoken"].symlink_to(shared_file("llama3_tokenizer/tokenizer.model"))


CHAT_TEMPLATES = {  # checkpoints whose chat template is bad, and the file it is in
    "template_latin1": ("chat_template.jinja", "{{ '\xe9' }}".encode("latin-1")),
    "template_loops": ("chat_template.jinja", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                              "{% endfor %}"),
    "template_floods": ("chat_template.jinja", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"),
    "template_multiplies": ("chat_template.jinja", "{{ 'x' * 60000000 }}"),
    "template_pads": ("chat_template.jinja", "{{ 'x'|center(1000000000) }}"),
    "template_formats": ("chat_template.jinja", "{{ '{:>20}'.format('x') }}{{ '%.1000000000f' % 1.5 }}"),
    "template_replaces": ("chat_template.jinja", "{% set s = 'x' * 10000 %}{{ s.replace('x', s) }}"),
    "template_recurses": ("chat_template.jinja", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"),
    "template_number": ("tokenizer_config.json", json.dumps({"chat_template": 5})),
    "template_list": ("tokenizer_config.json", json.dumps({"chat_template": ["{{ 'x' }}"]})),
}


def add_generation_round3_assets(a: dict[str, Path]) -> None:
    """Files for the generation rows of reliability round 3: requests, chat templates, an adapter, a checkpoint."""
    tmp, ckpt = a["tmp"], a["ckpt"]
    a["requests"], a["requests_latin1"], a["requests_deep"] = (tmp / f"{n}.jsonl" for n in ("ok", "latin1", "deep"))
    a["requests"].write_text('{"prompt": "Once"}\n')
    a["requests_latin1"].write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    a["requests_deep"].write_text("[" * 100_000 + "]" * 100_000 + "\n")
    for name, (file, content) in {**CHAT_TEMPLATES, "ckpt_without_bos": ("tokenizer_config.json",
                                                                          '{"add_bos_token": false}')}.items():
        a[name] = tmp / name
        shutil.copytree(ckpt, a[name])
        (a[name] / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    model = load_model(ckpt, adapter=True)
    a["extreme_adapter"] = tmp / "extreme_adapter.safetensors"
    save_adapter(a["extreme_adapter"], None, model.config,
                 state_dict={k: torch.full_like(v, 1e30) for k, v in adapter_state_dict(model).items()})
    a["fingerprinted_adapter"] = tmp / "fingerprinted_adapter.safetensors"
    save_adapter(a["fingerprinted_adapter"], model, model.config, fingerprint=open_checkpoint(ckpt).fingerprint)
    a["ckpt_other_weights"] = tmp / "ckpt_other_weights"  # the same shape and tokenizer, other weights
    shutil.copytree(ckpt, a["ckpt_other_weights"])
    weights = load_file(ckpt / WEIGHTS_FILE)
    save_file({k: v * 1.01 for k, v in weights.items()}, a["ckpt_other_weights"] / WEIGHTS_FILE)


def add_deep_nesting_assets(a: dict[str, Path]) -> None:
    """Files whose JSON or YAML nests 100,000 deep: data files, a model config, an HF config.json, a --config file."""
    tmp, deep = a["tmp"], "[" * 100_000 + "]" * 100_000
    a["deep_json"], a["deep_jsonl"] = tmp / "deep.json", tmp / "deep.jsonl"
    a["deep_json"].write_text(deep)
    a["deep_jsonl"].write_text(deep + "\n")
    a["ckpt_deep_yaml"] = tmp / "ckpt_deep_yaml"
    shutil.copytree(a["ckpt"], a["ckpt_deep_yaml"])
    (a["ckpt_deep_yaml"] / CONFIG_FILE).write_text(f"n_layer: {deep}\n")
    a["hf_deep_config"] = tmp / "hf_deep_config"
    a["hf_deep_config"].mkdir()
    (a["hf_deep_config"] / "config.json").write_text(deep)
    shutil.copyfile(a["tok512"], a["hf_deep_config"] / "tokenizer.model")
    a["deep_config_yaml"] = tmp / "deep_config.yaml"
    a["deep_config_yaml"].write_text(f"train: {deep}\n")


def test_an_adapter_of_another_base_is_used_when_allowed(assets, capfd):
    result = run_script_in_this_process("generate/adapter.py", "--checkpoint_dir", str(assets["ckpt_other_weights"]),
                                        "--adapter_path", str(assets["fingerprinted_adapter"]), "--max_new_tokens",
                                        "3", "--prompt", "Hi", "--allow_other_base", "true", capfd=capfd)
    assert result.returncode == 0 and "error" not in result.stderr, result.stderr


def test_allow_other_base_is_an_option_where_adapters_are_loaded(capfd):
    for script, offered in (("generate/adapter.py", True), ("generate/serve.py", True), ("generate/base.py", False)):
        result = run_script_in_this_process(script, "--help", capfd=capfd)
        assert result.returncode == 0 and ("--allow_other_base" in result.stdout) == offered, script


def row_args(row: Row, assets: dict[str, Path]) -> list[str]:
    """The row's arguments with the assets' paths filled in."""
    paths = {name: str(path) for name, path in assets.items()}
    paths["out"] = str(assets["tmp"] / "out" / row.id)
    return [arg.format(**paths) for arg in row.args]


def asks_for_several_devices(row: Row) -> bool:
    return any(option in ("--devices", "--trainer.devices") and value != "1"
               for option, value in zip(row.args, row.args[1:]))


@pytest.fixture(scope="module")
def own_process_outcomes(request, assets) -> dict[str, subprocess.CompletedProcess]:
    """The result of every selected ``own_process`` row, run in parallel (each is mostly interpreter start-up)."""
    selected = [item.callspec.params["row"] for item in request.session.items
                if item.module is request.module and "row" in getattr(getattr(item, "callspec", None), "params", {})]
    selected = [r for r in selected if r.own_process and not (r.without_gpu and torch.cuda.is_available())]
    selected.sort(key=lambda r: r.script in QUICK_SCRIPTS)  # the scripts that import Lightning (~5 s) first
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        results = pool.map(lambda r: run_script(r.script, *row_args(r, assets), timeout=TIMEOUT), selected)
        return dict(zip([r.id for r in selected], results))


def test_rows_cover_every_script_and_enough_cases():
    scripts = {r.script for r in ROWS}
    assert scripts == {"scripts/convert_checkpoint.py", "scripts/prepare_alpaca.py", "finetune/adapter.py",
                       "finetune/adapter_trainer.py", "generate/base.py", "generate/adapter.py",
                       "scripts/extract_adapter.py"}
    assert len(ROWS) >= 25 and len({r.id for r in ROWS}) == len(ROWS)
    assert {r.script for r in ROWS if r.own_process} == scripts  # each script's wiring, as a user runs it
    assert all(r.own_process for r in ROWS if asks_for_several_devices(r))  # their launcher starts processes


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_exits_with_one_clear_line(row, own_process_outcomes, assets, capfd):
    if row.without_gpu and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    if row.own_process:
        result = own_process_outcomes[row.id]
    else:
        result = run_script_in_this_process(row.script, *row_args(row, assets), capfd=capfd)
    output = f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr + result.stdout, output
    assert result.returncode == row.exit_code, output
    lines = [line.strip() for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors, output
    pattern = row.message.format(**{name: re.escape(str(path)) for name, path in assets.items()})
    assert re.match(pattern, errors[0]), f"{errors[0]!r} does not match {pattern!r}\n{output}"
    if row.exit_code == 1:  # a user error: one line, the last one
        assert len(errors) == 1 and lines[-1] == errors[0], output
    assert not assets["marker"].exists(), f"{row.id}: a pickle's code was run"


def test_the_pickles_payload_is_live(tmp_path):
    """The refused pickles would have run code: an unsafe load creates the marker."""
    marker = tmp_path / "marker"
    torch.save({"model": WritesAFile(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("entry_point", ["run_cli", "adapter_trainer"])
def test_out_of_memory_is_one_line_that_says_what_to_change(entry_point, capsys):
    message = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
               "1.06 GiB is free. Of the allocated memory 75.3 GiB is allocated by PyTorch")

    def out_of_memory(**kwargs) -> None:
        raise torch.OutOfMemoryError(message)

    with pytest.raises(SystemExit) as exit_info:
        if entry_point == "run_cli":
            run_cli(out_of_memory, [])
        else:
            with mock.patch.object(AdapterCLI, "__init__", lambda self, **kwargs: out_of_memory()):
                trainer_main([])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    option = "--train.micro_batch_size" if entry_point == "run_cli" else "--model.train.micro_batch_size"
    assert len(lines) == 1 and lines[0].startswith(
        "error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        f"79.19 GiB of which 1.06 GiB is free): lower {option} (the global batch stays the same)"), lines


OPTION_MISTAKES = {  # a script, and an option of it that takes a number or a choice (None: it has none)
    "finetune/adapter.py": "--train.learning_rate", "finetune/adapter_trainer.py": "--model.train.learning_rate",
    "generate/base.py": "--max_new_tokens", "generate/adapter.py": "--temperature", "generate/serve.py": "--port",
    "scripts/convert_checkpoint.py": "--dtype", "scripts/prepare_alpaca.py": "--val_size",
    "scripts/extract_adapter.py": None, "scripts/download.py": None}


@pytest.mark.parametrize("script", OPTION_MISTAKES)
def test_an_option_mistake_is_one_line_and_exit_1(script, capfd):
    mistakes = [("--no_such_option", "1"), ("--seed",)]
    if OPTION_MISTAKES[script]:
        mistakes.append((OPTION_MISTAKES[script], "not-a-number"))
    for args in mistakes:
        result = run_script_in_this_process(script, *args, capfd=capfd)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert args[0] in lines[0] and lines[0].endswith("see --help"), lines


def test_an_exception_is_told_in_one_line_even_without_a_message():
    assert message_line(RuntimeError("first\nsecond")) == "first"
    assert message_line(RuntimeError()) == "" and message_line(OSError("  \n")) == ""
    assert one_line(KeyError()) == "KeyError: "
    assert one_line(RuntimeError("CUDA error\n  at step 3")) == "RuntimeError: CUDA error"
    assert one_line(UserError("a bad option")) == "a bad option"
