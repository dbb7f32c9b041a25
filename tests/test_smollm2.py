"""A real current chat model end to end: SmolLM2-135M-Instruct (converted from its GGUF) fine-tuned on the real Alpaca
records. The first validation loss is the base model's, 16 steps lower it by more than 3%, the adapter changes the
greedy answer; chat-style samples learn exactly the assistant's tokens; generation follows the adapter's style.
"""

import json
import math
import re
from typing import Callable, Optional

import pytest
import torch
from tests.train.test_fabric_loop import cli_args, logged

from bench.common import int4_reference
from conftest import shared_file
from lit_adapter.train import fabric_loop as training
from lit_adapter.checkpoint import adapter_prompt_style, load_model, save_adapter
from lit_adapter.cli import run_cli
from lit_adapter.data.batching import IGNORE_INDEX
from lit_adapter.data.prepare import prepare_dataset, tokenize_sample
from lit_adapter.data.records import load_records
from lit_adapter.data.module import InstructionDataModule
from lit_adapter.prompts import get_style, user_message
from lit_adapter.train.recipe import loss_fn
from lit_adapter.data.cli import main as prepare
from lit_adapter.errors import UserError
from lit_adapter.files import read_safetensors_metadata
from lit_adapter.generate.cli import Prompting, load
from lit_adapter.generate.cli import main as generate
from lit_adapter.generate.requests import Request
from lit_adapter.precision import PRECISIONS, base_dtype
from lit_adapter.tokenizer import Tokenizer

INSTRUCTION = "Give three tips for staying healthy."
# the recipe of finetune/configs/smollm2_quick.yaml (the quick start) shortened from 40 steps to 16 (a warm-up of 4,
# an evaluation every 8: under a minute on a 2-core CI machine), validated on the first 2 of the 5 validation
# batches (16 of the 35 samples, two thirds of their answer tokens), with short evaluation samples
RUN = {"accelerator": "cpu", "adapter.start_layer": 14, "train.max_steps": 16, "train.global_batch_size": 8,
       "train.micro_batch_size": 8, "train.learning_rate": 0.03, "train.warmup_steps": 4, "eval.interval": 8,
       "eval.max_batches": 2, "eval.max_new_tokens": 8, "eval.instruction": INSTRUCTION, "save_interval": 1000}


@pytest.fixture(scope="module")
def alpaca(smollm2_checkpoint, tmp_path_factory) -> dict:
    """The real records prepared for SmolLM2 in both prompt styles (samples cut at 96 tokens: quick CPU steps; the
    quick start keeps 128)."""
    records, _ = load_records(shared_file("alpaca/alpaca_data_first335.json"), skip_bad_records=True)
    tokenizer = Tokenizer(smollm2_checkpoint)
    root = tmp_path_factory.mktemp("smollm2_data")
    for style in ("alpaca", "chat"):
        prepare_dataset(records, tokenizer, root / style, val_size=35, max_seq_length=96, style=style)
    return {"records": records, "tokenizer": tokenizer, **{style: root / style for style in ("alpaca", "chat")}}


@pytest.fixture(scope="module")
def fine_tuned(smollm2_checkpoint, alpaca, tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("smollm2_run")
    torch.set_num_threads(2)
    run_cli(training.main, cli_args({"checkpoint_dir": smollm2_checkpoint, "data_dir": alpaca["alpaca"],
                                     "out_dir": out_dir, **RUN}))
    return {"out_dir": out_dir, "val_loss": logged(out_dir, "val_loss")}


def base_val_loss(checkpoint_dir, data_dir, max_batches: Optional[int], precision: str = "32-true",
                  quantize: Optional[Callable] = None) -> float:
    """The validation loss per answer token of the base model in ``precision`` (its blocks stored by ``quantize``
    if given, else as the precision stores them), computed here without the training code."""
    model = load_model(checkpoint_dir, dtype=base_dtype(precision, "cpu"),
                       quantize=quantize or PRECISIONS[precision].quantize).eval()
    data = InstructionDataModule(data_dir, global_batch_size=8, micro_batch_size=8)
    total = count = 0.0
    with torch.no_grad():
        for i, (input_ids, targets) in enumerate(data.val_dataloader()):
            if i == max_batches:  # None: all
                break
            total += loss_fn(model(input_ids), targets, "sum").item()
            count += (targets != IGNORE_INDEX).sum().item()
    return total / count


def test_first_validation_loss_is_the_base_models(smollm2_checkpoint, alpaca, fine_tuned):
    expected = base_val_loss(smollm2_checkpoint, alpaca["alpaca"], RUN["eval.max_batches"])
    assert fine_tuned["val_loss"][0] == pytest.approx(expected, rel=1e-5)


def test_sixteen_steps_lower_the_validation_loss_by_more_than_3_percent(fine_tuned):
    curve = fine_tuned["val_loss"]
    assert sorted(curve) == [0, 8, 16]
    assert curve[16] < 0.97 * curve[0], curve  # measured: 2.4730 -> 2.2468 (-9.1%)


def test_weight_only_bases_keep_the_perplexity_on_the_alpaca_validation_records(smollm2_checkpoint, alpaca):
    """On the first 16 validation records: int8-base within 1%, int4-base within 5%. int4-base's kernel needs a GPU:
    its weights are checked here dequantized (the GPU bench compares the kernel with them)."""
    perplexity = {name: math.exp(base_val_loss(smollm2_checkpoint, alpaca["alpaca"], 2, precision, quantize=q))
                  for name, precision, q in (("32-true", "32-true", None), ("int8-base", "int8-base", None),
                                             ("int4-base", "32-true", int4_reference))}
    assert perplexity["int8-base"] == pytest.approx(perplexity["32-true"], rel=0.01), perplexity
    assert perplexity["int4-base"] == pytest.approx(perplexity["32-true"], rel=0.05), perplexity


def test_the_adapter_changes_the_greedy_answer(smollm2_checkpoint, fine_tuned, capsys):
    options = {"checkpoint_dir": smollm2_checkpoint, "prompt": INSTRUCTION, "temperature": 0, "max_new_tokens": 40}
    base = generate(prompt_style="alpaca", **options)[0]
    adapted = generate(adapter_path=fine_tuned["out_dir"] / "adapter.safetensors", **options)[0]
    assert adapter_prompt_style(fine_tuned["out_dir"] / "adapter.safetensors") == "alpaca"
    assert base.strip() and adapted.strip() and adapted != base


def test_chat_samples_learn_exactly_the_assistant_turns(alpaca):
    tokenizer = alpaca["tokenizer"]
    record = {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
                           {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]}
    sample, truncated = tokenize_sample(record, tokenizer, 512, style="chat")
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    learned = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    end = [tokenizer.special_tokens["<|im_end|>"]]  # each answer's end-of-turn token, not the newline after it
    assert learned == (tokenizer.encode("Blue.", bos=False).tolist() + end
                       + tokenizer.encode("Red.", bos=False).tolist() + end)
    # the prompt of the first answer is the model's own chat prompt, as generation writes it
    prompt = get_style("chat").encode(tokenizer, [user_message("Name a color.")]).tolist()
    assert ids[:len(prompt)] == prompt and not truncated


def test_chat_prepared_data_records_its_style_and_masks_the_template(alpaca):
    data = InstructionDataModule(alpaca["chat"], global_batch_size=8, micro_batch_size=8)
    data.setup()
    assert data.prompt_style == "chat"
    tokenizer = alpaca["tokenizer"]
    im_end = [tokenizer.special_tokens["<|im_end|>"]]
    for sample in data.splits["val"]:
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert tokenizer.decode(ids[:first]).endswith("assistant\n")  # the template's generation prompt is masked
        assert im_end[0] in [label for label in labels if label != IGNORE_INDEX]  # the answer's end is learned


def test_a_plain_prompt_that_ends_at_once_says_so_and_suggests_the_chat_style(smollm2_checkpoint, capsys):
    assert generate(checkpoint_dir=smollm2_checkpoint, prompt=INSTRUCTION, temperature=0, max_new_tokens=8) == [""]
    assert "write its prompts in it with --prompt_style chat" in capsys.readouterr().err


def test_each_row_of_a_batch_is_written_in_its_adapters_style(smollm2_checkpoint, tmp_path, capsys):
    model = load_model(smollm2_checkpoint, adapter=True)
    for style in ("chat", "alpaca"):
        save_adapter(tmp_path / f"{style}.safetensors", model, model.config, style)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"prompt": "Name a color.", "adapter": name}) + "\n"
                                for name in ("chat", "alpaca", None)))
    adapters = [str(tmp_path / f"{style}.safetensors") for style in ("chat", "alpaca")]
    _, _, _, prompts, _ = load(smollm2_checkpoint, adapters, requests, Request(""), Prompting(None, None), None, "cpu")
    tokenizer = Tokenizer(smollm2_checkpoint)
    user = user_message("Name a color.")
    assert [p.tolist() for p in prompts] == [get_style(style).encode(tokenizer, [user]).tolist()
                                             for style in ("chat", "alpaca", "plain")]
    assert len({tuple(p.tolist()) for p in prompts}) == 3
    with pytest.raises(UserError, match="the alpaca prompt style has no system prompt"):  # the Alpaca row
        load(smollm2_checkpoint, adapters, requests, Request(""), Prompting(None, "Be brief."), None, "cpu")
    requests.write_text('{"prompt": "Name a color.", "adapter": "chat"}\n{"prompt": "Name a color."}\n')
    _, _, _, prompts, _ = load(smollm2_checkpoint, adapters, requests, Request(""), Prompting(None, "Be brief."),
                               None, "cpu")
    system = {"role": "system", "content": "Be brief."}
    assert [p.tolist() for p in prompts] == [get_style(style).encode(tokenizer, [system, user]).tolist()
                                             for style in ("chat", "plain")]
    requests.write_text('{"prompt": "Name a color.", "adapter": "alpaca"}\n')
    load(smollm2_checkpoint, adapters, requests, Request(""), Prompting("chat", None), None, "cpu")
    assert "--prompt_style chat writes the prompts to adapter 'alpaca', which was trained in the alpaca style" in \
        capsys.readouterr().err


COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]


def test_a_small_chat_set_prepares_and_fine_tunes_with_all_defaults(smollm2_checkpoint, tmp_path, capsys):
    """20 two-turn chat records, and only paths given: the defaults fit the data and the model."""
    records = tmp_path / "chats.jsonl"
    records.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Name color number {i}."}, {"role": "assistant", "content": COLORS[i % 10]},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": COLORS[(i + 1) % 10]}]}) + "\n"
        for i in range(20)))
    data, out = tmp_path / "data", tmp_path / "colors"
    run_cli(prepare, ["--checkpoint_dir", str(smollm2_checkpoint), "--data_file", str(records),
                      "--destination_dir", str(data)])
    printed = capsys.readouterr().out
    assert "val_size 2: a tenth of the 20 records" in printed and "prompt style: chat" in printed
    run_cli(training.main, ["--checkpoint_dir", str(smollm2_checkpoint), "--data_dir", str(data), "--out_dir", str(out),
                            "--eval.max_new_tokens", "4"])
    printed = capsys.readouterr().out
    assert "train.global_batch_size 16: the training set holds 18 samples, fewer than 64" in printed
    assert "15 layers x 10 prompts" in printed  # the top half of a small model's 30 layers
    assert adapter_prompt_style(out / "adapter.safetensors") == "chat"
    assert read_safetensors_metadata(out / "adapter.safetensors")["name"] == "colors"
    assert re.search(r"step 6: val loss \d\.\d+\n(Name color number \d+\.|Another\?)\n", printed), printed
