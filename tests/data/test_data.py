"""The Alpaca pipeline on the real assets: records, tokenization and masks, truncation, batching, collation,
the data module and the prepare_alpaca.py command line."""

import importlib.util
import itertools
import json
import re
import shutil
from collections import Counter
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ROOT, run_script, run_script_in_this_process
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.data import _set_sampler_epoch

from lit_adapter.data.batching import StepPlan, collate, padding_fraction
from lit_adapter.checkpoint import save_config
from lit_adapter.config import Config
from lit_adapter.data.batching import IGNORE_INDEX
from lit_adapter.data.prepare import prepare_dataset, tokenize_sample
from lit_adapter.data.records import download_alpaca, load_records
from lit_adapter.data.module import InstructionDataModule
from lit_adapter.errors import UserError
from lit_adapter.prompts import STYLES
from lit_adapter.tokenizer import Tokenizer

alpaca_prompt = STYLES["alpaca"].instruction

EMPTY_OUTPUT_RECORD = 284  # the one record of the first 335 whose output is ""
GOOD_RECORDS = 334
fixture_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, database=None)


@cache
def tokenizer(path: Path) -> Tokenizer:
    return Tokenizer(path)


@cache
def real_records(path: Path) -> list[dict[str, str]]:
    records, problems = load_records(path, skip_bad_records=True)
    assert len(records) == GOOD_RECORDS and len(problems) == 1
    return records


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, bos=False).tolist()


def response_tokens(tok: Tokenizer, prompt_text: str, output: str) -> list[int]:
    """The response part of the prompt + output tokens (output alone where a token spans the prompt's end)."""
    prompt, full = encode(tok, prompt_text), encode(tok, prompt_text + output)
    return full[len(prompt):] if full[:len(prompt)] == prompt else encode(tok, output)


def split_sample(sample: dict[str, torch.Tensor]) -> tuple[list[int], list[int], int]:
    """ids, labels and the number of masked (prompt) positions at the start."""
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    return ids, labels, labels.count(IGNORE_INDEX)


# --- records ------------------------------------------------------------------------------------------------------

def test_real_records_load_with_the_empty_output_reported(alpaca_json):
    with pytest.raises(UserError, match=rf"{alpaca_json}: record {EMPTY_OUTPUT_RECORD} has an empty 'output'"):
        load_records(alpaca_json)
    records, problems = load_records(alpaca_json, skip_bad_records=True)
    assert len(records) == GOOD_RECORDS
    assert problems == [f"record {EMPTY_OUTPUT_RECORD} has an empty 'output' (nothing to learn)"]
    assert records[0]["instruction"] == "Give three tips for staying healthy."
    assert all(set(r) == {"instruction", "input", "output"} for r in records)


GOOD = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


@pytest.mark.parametrize("content, fragments", [
    ('[{"instruction": "a", "output": "b"}, {oops}]', ["not valid JSON", "line 1", "record 1"]),
    (json.dumps([GOOD, GOOD])[:-20], ["not valid JSON", "record 1", "truncated"]),
    ('{"instruction": "a", "output": "b"}', ["holds a JSON dict, expected a list"]),
    (json.dumps([GOOD, "text"]), ["record 1 is a JSON str"]),
    (json.dumps([GOOD, GOOD, {"instruction": "a"}]), ["record 2 has no 'output'"]),
    (json.dumps([{"input": "x", "output": "y"}]), ["record 0 has no 'instruction'"]),
    (json.dumps([GOOD, {**GOOD, "input": 7}]), ["record 1: 'input' is a int, expected a string"]),
    (json.dumps([GOOD, {**GOOD, "output": None}]), ["record 1: 'output' is a NoneType"]),
    (json.dumps([{**GOOD, "output": " \n"}]), ["record 0 has an empty 'output'"]),
    ("[]", ["has no usable records"]),
    ("", ["not valid JSON", "line 1 column 1"]),
])
def test_bad_files_name_the_file_and_record(tmp_path, content, fragments):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_records(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_truncated_real_file_names_the_broken_record(tmp_path, alpaca_json):
    text = alpaca_json.read_text()
    record_starts = [i + 1 for i in range(len(text)) if text.startswith("\n    {", i)]
    path = tmp_path / "truncated.json"
    path.write_text(text[:record_starts[200] + 40])
    with pytest.raises(UserError, match=r"truncated\.json is not valid JSON .*, in record 200\)"):
        load_records(path)


def test_missing_file_and_missing_input(tmp_path):
    with pytest.raises(UserError, match="nothere.json not found"):
        load_records(tmp_path / "nothere.json")
    path = tmp_path / "no_input.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi!", "extra": 1}]))
    assert load_records(path) == ([{"instruction": "Say hi.", "input": "", "output": "Hi!"}], [])


def test_skip_bad_records_counts_and_skips(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([GOOD, [1], {**GOOD, "output": ""}, GOOD, {"output": "x"}]))
    records, problems = load_records(path, skip_bad_records=True)
    assert records == [GOOD, GOOD]
    assert [p.split(" ")[1] for p in problems] == ["1", "2", "4"]
    path.write_text(json.dumps([[1], {"output": ""}]))
    with pytest.raises(UserError, match="no usable records \\(2 bad ones skipped\\)"):
        load_records(path, skip_bad_records=True)


# --- tokenization -------------------------------------------------------------------------------------------------

def test_template_masks_and_eos_on_real_records(alpaca_json, llama_tokenizer):
    tok = tokenizer(llama_tokenizer)
    for record in real_records(alpaca_json):
        sample, truncated = tokenize_sample(record, tok, max_seq_length=2048)
        ids, labels, n_masked = split_sample(sample)
        prompt_text = alpaca_prompt(record["instruction"], record["input"])
        prompt = encode(tok, prompt_text)
        assert not truncated
        assert ids == [tok.bos_id] + encode(tok, prompt_text + record["output"]) + [tok.eos_id]
        assert n_masked == 1 + len(prompt) and ids[1:n_masked] == prompt  # the prompt as generation encodes it
        assert labels == [IGNORE_INDEX] * n_masked + ids[n_masked:]
        assert tok.decode(ids) == prompt_text + record["output"]
        assert sample["input_ids"].dtype == sample["labels"].dtype == torch.long
        unmasked, _ = tokenize_sample(record, tok, max_seq_length=2048, mask_prompt=False)
        assert unmasked["labels"].tolist() == ids


def test_first_real_record_reads_as_the_alpaca_template(alpaca_json, llama_tokenizer):
    tok = tokenizer(llama_tokenizer)
    sample, _ = tokenize_sample(real_records(alpaca_json)[0], tok, max_seq_length=512)
    text = tok.decode(sample["input_ids"].tolist())
    assert text.startswith("Below is an instruction that describes a task. Write a response")
    assert "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1.Eat a balanced diet" in text


def test_response_is_tokenized_alone_where_a_token_would_span_the_prompt_end():
    class MergingTokenizer:
        """One token per character, except that a newline and the character after it make one token."""
        bos_id, eos_id, add_bos = 1, 2, True
        vocab: dict[str, int] = {}

        def token_spans(self, text: str) -> list[tuple[int, int, int]]:
            return [(self.vocab.setdefault(m.group(), 3 + len(self.vocab)), m.start(), m.end())
                    for m in re.finditer(r"\n.?|.", text, re.DOTALL)]

        def encode(self, text: str) -> torch.Tensor:
            return torch.tensor([token for token, _, _ in self.token_spans(text)])

        def escape(self, text: str) -> str:
            return text

    tok = MergingTokenizer()
    record = {"instruction": "Hi", "input": "", "output": "ok"}
    sample, _ = tokenize_sample(record, tok, max_seq_length=512)
    prompt = tok.encode(alpaca_prompt("Hi")).tolist()
    assert sample["input_ids"].tolist() == [1] + prompt + tok.encode("ok").tolist() + [2]
    assert sample["labels"].tolist().count(IGNORE_INDEX) == 1 + len(prompt)


def test_truncation_keeps_eos_and_the_prompt_end(alpaca_json, llama_tokenizer):
    tok = tokenizer(llama_tokenizer)
    record = max(real_records(alpaca_json), key=lambda r: len(r["output"]))
    prompt_text = alpaca_prompt(record["instruction"], record["input"])
    prompt, response = encode(tok, prompt_text), response_tokens(tok, prompt_text, record["output"])

    sample, truncated = tokenize_sample(record, tok, max_seq_length=len(prompt) + 12)
    ids, labels, n_masked = split_sample(sample)
    assert truncated and len(ids) == len(prompt) + 12 and ids[-1] == tok.eos_id
    assert ids[:n_masked] == [tok.bos_id] + prompt and ids[n_masked:-1] == response[:10]

    sample, truncated = tokenize_sample(record, tok, max_seq_length=16)
    ids, labels, n_masked = split_sample(sample)
    assert truncated and len(ids) == 16 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:n_masked] == prompt[-13:]  # the prompt's end, with "### Response:"
    assert labels[n_masked:] == [response[0], tok.eos_id]
    assert tok.decode(ids[1:n_masked]).endswith("### Response:\n")

    with pytest.raises(UserError, match="max_seq_length must be at least 3"):
        tokenize_sample(record, tok, max_seq_length=2)


@settings(fixture_settings, max_examples=200)
@given(instruction=st.text(max_size=60), input=st.text(max_size=40), output=st.text(max_size=300),
       mask_prompt=st.booleans(), cut=st.sampled_from(["prompt", "response", "nothing"]), data=st.data())
def test_tokenize_sample_properties(tok512, instruction, input, output, mask_prompt, cut, data):
    tok = tokenizer(tok512)
    prompt_text = alpaca_prompt(instruction, input)
    prompt, response = encode(tok, prompt_text), response_tokens(tok, prompt_text, output)
    whole = len(prompt) + len(response) + 2
    bounds = {"prompt": (3, len(prompt) + 2), "response": (len(prompt) + 3, whole - 1), "nothing": (whole, whole + 5)}
    assume(bounds[cut][0] <= bounds[cut][1])
    max_seq_length = data.draw(st.integers(*bounds[cut]), label="max_seq_length")

    record = {"instruction": instruction, "input": input, "output": output}
    sample, truncated = tokenize_sample(record, tok, max_seq_length, mask_prompt)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) <= max_seq_length
    assert truncated == (whole > max_seq_length) and (len(ids) == max_seq_length if truncated else len(ids) == whole)
    if not mask_prompt:
        assert labels == ids
        return
    _, _, n_masked = split_sample(sample)
    assert labels == [IGNORE_INDEX] * n_masked + ids[n_masked:]
    kept_prompt, kept_response = ids[1:n_masked], ids[n_masked:-1]
    assert kept_prompt == prompt[len(prompt) - len(kept_prompt):]  # masked exactly: the prompt (or its end)
    assert kept_response == response[:len(kept_response)]  # learned exactly: the response (or its start)
    assert len(kept_response) >= min(len(response), 1)
    if len(kept_prompt) < len(prompt):
        assert len(kept_response) == min(len(response), 1)
    event("prompt cut" if len(kept_prompt) < len(prompt) else "response cut" if truncated else "whole")
    _, targets = collate([sample])
    assert (targets != IGNORE_INDEX).sum().item() == len(kept_response) + 1  # masked tokens never count
    assert targets[0, -1].item() == tok.eos_id


# --- batching -----------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=100, database=None)
@given(lengths=st.lists(st.integers(2, 500), min_size=1, max_size=200), per_rank=st.integers(1, 12),
       num_replicas=st.integers(1, 4), micro_batch_size=st.one_of(st.none(), st.integers(1, 8)),
       micro_batch_tokens=st.one_of(st.none(), st.integers(1, 2000)), steps_per_chunk=st.integers(1, 4),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 3))
def test_steps_hold_every_sample_once_per_epoch(lengths, per_rank, num_replicas, micro_batch_size,
                                                micro_batch_tokens, steps_per_chunk, seed, epoch):
    step_size = per_rank * num_replicas
    def plan(rank: int, **kwargs) -> StepPlan:
        return StepPlan(lengths, [1] * len(lengths), step_size, micro_batch_size, micro_batch_tokens, seed,
                        num_replicas, rank, steps_per_chunk, **kwargs)

    n, plans = len(lengths), [plan(rank) for rank in range(num_replicas)]
    first, last = plans[0].first_step(epoch), plans[0].first_step(epoch + 2)
    # the samples of all epochs in a row; each epoch is a permutation of all of them
    stream = [i for e in range(last * step_size // n + 1) for i in plans[0].epoch_order(e)]
    assert all(sorted(plans[0].epoch_order(e)) == list(range(n)) for e in range(epoch, epoch + 2))
    for step in range(first, last):
        samples, counts = [], set()
        for rank_plan in plans:
            batches, tokens = rank_plan.step(step)
            assert tokens == step_size  # one response token per sample here
            filled = [batch for batch in batches if batch]
            assert batches == filled + [[]] * (len(batches) - len(filled))  # empty fillers, last
            counts.add(len(batches))
            for batch in filled:
                width = max(lengths[i] - 1 for i in batch)
                assert micro_batch_size is None or len(batch) <= micro_batch_size
                assert micro_batch_tokens is None or len(batch) == 1 or len(batch) * width <= micro_batch_tokens
            samples += [i for batch in batches for i in batch]
        assert len(counts) == 1  # every rank runs as many passes (the collectives in them must pair up)
        # step k is the stream's samples [k * step_size, (k + 1) * step_size), dealt out without loss or repeat
        assert sorted(samples) == sorted(stream[step * step_size:(step + 1) * step_size])
    one_rank = StepPlan(lengths, [1] * n, step_size, None, None, seed, 1, 0, steps_per_chunk)
    assert one_rank.step_samples(first) == plans[0].step_samples(first)  # the ranks do not change the steps


def test_steps_shuffle_per_epoch_group_lengths_and_fill_the_token_budget():
    lengths = [(i * 7919) % 600 + 20 for i in range(2000)]
    plan = StepPlan(lengths, [1] * 2000, 64, micro_batch_tokens=4096, seed=3)
    assert plan.step_samples(0) == StepPlan(lengths, [1] * 2000, 64, micro_batch_size=4, seed=3).step_samples(0)
    assert plan.epoch_order(1) != plan.epoch_order(0)
    assert max(lengths[i] for i in plan.step_samples(0)) == max(lengths)  # the longest step comes first
    spreads = [max(lengths[i] for i in plan.step_samples(k)) - min(lengths[i] for i in plan.step_samples(k))
               for k in range(31)]
    assert sum(spreads) / len(spreads) < 40  # sorted chunks of 1024 over lengths 20..619
    for step in range(8):
        batches, _ = plan.step(step)
        tokens = [len(b) * max(lengths[i] - 1 for i in b) for b in batches]
        assert max(tokens) <= 4096 and min(tokens) > 0.75 * max(tokens)  # within the budget, and even
        filled = []  # [width, rows] of each micro-batch when every one is filled up to the budget
        for i in sorted(plan.step_samples(step), key=lengths.__getitem__, reverse=True):
            if filled and (filled[-1][1] + 1) * filled[-1][0] <= 4096:
                filled[-1][1] += 1
            else:
                filled.append([lengths[i] - 1, 1])
        assert len(batches) == len(filled)  # no more micro-batches than filling them up takes
    assert 2000 // 64 == plan.first_step(1) - 1 and plan.epoch_of(plan.first_step(1)) == 1
    with pytest.raises(UserError, match="multiple of the 3 ranks"):
        StepPlan(lengths, [1] * 2000, 64, num_replicas=3)
    with pytest.raises(UserError, match="rank 2 must lie"):
        StepPlan(lengths, [1] * 2000, 64, num_replicas=2, rank=2)


def test_a_rank_with_fewer_micro_batches_gets_empty_ones_that_count_for_nothing():
    lengths = [300, 100, 90, 80]  # rank 0 takes 300 and 90, rank 1 100 and 80: a budget of 250 cuts 2 and 1
    plans = [StepPlan(lengths, [1] * 4, 4, micro_batch_tokens=250, num_replicas=2, rank=rank) for rank in (0, 1)]
    assert [plan.step(0)[0] for plan in plans] == [[[0], [2]], [[1, 3], []]]
    input_ids, targets = collate([], pad_to_multiple_of=8)
    assert input_ids.shape == targets.shape == (1, 8) and (targets == IGNORE_INDEX).all()
    assert padding_fraction([(input_ids, targets)]) == 1.0


def real_samples(alpaca_json: Path, llama_tokenizer: Path) -> list[dict[str, torch.Tensor]]:
    tok = tokenizer(llama_tokenizer)
    return [tokenize_sample(r, tok, max_seq_length=512)[0] for r in real_records(alpaca_json)]


def epoch_padding(samples, micro_batch_tokens: int, epochs: int = 3, **plan_options) -> float:
    lengths = [len(s["input_ids"]) for s in samples]
    plan = StepPlan(lengths, [1] * len(lengths), 64, micro_batch_tokens=micro_batch_tokens, seed=1, **plan_options)
    batches = [collate([samples[i] for i in b]) for step in range(plan.first_step(epochs)) for b in plan.step(step)[0]]
    return padding_fraction(batches)


@pytest.mark.parametrize("micro_batch_tokens", [1024, 2048])
def test_padding_wastes_under_10_percent_on_real_alpaca(alpaca_json, llama_tokenizer, micro_batch_tokens):
    samples = real_samples(alpaca_json, llama_tokenizer)
    grouped = epoch_padding(samples, micro_batch_tokens)
    print(f"padding with micro_batch_tokens {micro_batch_tokens}: {grouped:.3f} grouped")
    assert grouped <= 0.10
    assert epoch_padding(samples, micro_batch_tokens, steps_per_chunk=1) > 1.5 * grouped  # sorted within steps only


# --- collate ------------------------------------------------------------------------------------------------------

def test_collate_shifts_and_pads():
    samples = [
        {"input_ids": torch.tensor([1, 5, 6, 7, 2]), "labels": torch.tensor([-100, -100, 6, 7, 2])},
        {"input_ids": torch.tensor([1, 8, 2]), "labels": torch.tensor([-100, 8, 2])},
    ]
    input_ids, targets = collate(samples)
    assert input_ids.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert targets.tolist() == [[-100, 6, 7, 2], [8, 2, -100, -100]]
    assert padding_fraction([(input_ids, targets)]) == pytest.approx(2 / 8)
    input_ids, targets = collate(samples, pad_id=3, pad_to_multiple_of=8)
    assert input_ids.shape == targets.shape == (2, 8) and input_ids.dtype == targets.dtype == torch.long
    assert input_ids[1].tolist() == [1, 8] + [3] * 6 and targets[0, 4:].tolist() == [-100] * 4
    assert padding_fraction([(input_ids, targets)] * 2) == pytest.approx(10 / 16)


# --- files, data module, command line -----------------------------------------------------------------------------

def test_prepare_writes_a_reproducible_split(tmp_path, alpaca_json, llama_tokenizer, capsys):
    records, tok = real_records(alpaca_json), tokenizer(llama_tokenizer)
    config = prepare_dataset(records, tok, tmp_path / "a", val_size=34, seed=7, max_seq_length=256, source=alpaca_json)
    train = torch.load(tmp_path / "a" / "train.pt", weights_only=True)
    val = torch.load(tmp_path / "a" / "val.pt", weights_only=True)
    assert (len(train), len(val)) == (300, 34)
    everything = Counter(tuple(tokenize_sample(r, tok, 256)[0]["input_ids"].tolist()) for r in records)
    assert Counter(tuple(s["input_ids"].tolist()) for s in train + val) == everything
    assert yaml.safe_load((tmp_path / "a" / "prep_config.yaml").read_text()) == config
    assert config["tokenizer"]["vocab_size"] == 32000 and config["max_seq_length"] == 256
    assert config["lengths"]["max"] == 256 and config["truncated"] > 0
    output = capsys.readouterr().out
    assert "tokens per sample: min 50, median" in output and f"truncated {config['truncated']} of 334" in output

    prepare_dataset(records, tok, tmp_path / "b", val_size=34, seed=7, max_seq_length=256)
    assert torch.load(tmp_path / "b" / "val.pt", weights_only=True)[0]["input_ids"].equal(val[0]["input_ids"])
    with pytest.raises(UserError, match=rf"val_size=334 does not fit {alpaca_json}: it has 334 records"):
        prepare_dataset(records, tok, tmp_path / "c", val_size=334, source=alpaca_json)


def test_data_module_serves_each_rank_its_batches(tmp_path, alpaca_json, llama_tokenizer):
    with pytest.raises(UserError, match="train.pt not found: run scripts/prepare_alpaca.py first"):
        InstructionDataModule(tmp_path).setup()
    prepare_dataset(real_records(alpaca_json), tokenizer(llama_tokenizer), tmp_path, val_size=34, max_seq_length=512)

    data = InstructionDataModule(tmp_path, global_batch_size=8, micro_batch_size=4, pad_to_multiple_of=8)
    loader = data.train_dataloader()  # the Trainer's: a micro-batch at a time, with its step's response tokens
    items = list(loader)
    assert len(items) == len(loader) == 76  # steps 0..37 start in epoch 0 (300 samples / 8 = 37.5)
    for [(_, targets)], _ in items:  # each row's last learned target is its EOS
        last_learned = ((targets != IGNORE_INDEX) * torch.arange(1, targets.size(1) + 1)).argmax(dim=1)
        assert (targets.gather(1, last_learned[:, None]) == 2).all()
    assert all(x.shape == y.shape and x.shape[1] % 8 == 0 for [(x, y)], _ in items)
    assert sum(x.shape[0] for [(x, _)], _ in items) == 304
    default = InstructionDataModule(tmp_path, global_batch_size=8, micro_batch_size=4)  # what both training routes use
    assert all(x.shape[1] % 8 == 0 for [(x, _)], _ in default.train_dataloader())
    for k in range(38):  # both micro-batches of a step carry the step's response tokens
        assert items[2 * k][1] == items[2 * k + 1][1] == sum(int((t != IGNORE_INDEX).sum()) for [(_, t)], _ in items[2 * k:2 * k + 2])
    assert sum(x.shape[0] for x, _ in data.val_dataloader()) == 34
    _set_sampler_epoch(loader, 4)  # what Lightning calls at each epoch start
    assert loader.sampler.epoch == 4
    steps = data.train_steps(start_step=37)  # the Fabric loop's: whole steps, straddling the epoch end
    (batches, tokens), _ = itertools.islice(steps, 2)
    assert sum(x.shape[0] for x, _ in batches) == 8 and tokens == sum(int((t != IGNORE_INDEX).sum()) for _, t in batches)

    seen, validated = [], []
    for rank in range(2):
        data = InstructionDataModule(tmp_path, global_batch_size=8, micro_batch_size=4)
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        validated.append([targets for _, targets in data.val_dataloader()])
        data.resume_at(epoch=0, batches_done=30)
        loader = data.train_dataloader()
        mine = [b for k in range(38) for b in data.plan().step(k)[0]]
        assert len(loader) == len(mine) == 38
        assert [b for b, _ in loader.sampler] == [[b] for b in mine[30:]] and len(list(loader)) == 8
        mine = mine[:37]  # the last step ends in the next epoch
        seen += [i for b in mine for i in b]
    assert len(seen) == len(set(seen)) == 296  # 37 whole steps of 8 in epoch 0; step 37 takes its last 4 and 4 of epoch 1
    assert len(validated[0]) == len(validated[1]) == 5  # the 34 samples' 9 micro-batches, and an empty filler
    assert sum(int((t != IGNORE_INDEX).any(dim=1).sum()) for targets in validated for t in targets) == 34  # each once


def test_download_is_atomic_and_says_what_to_do_offline(tmp_path, alpaca_json):
    destination = tmp_path / "alpaca_data.json"
    download_alpaca(destination, url=alpaca_json.as_uri())
    assert destination.read_bytes() == alpaca_json.read_bytes()
    with pytest.raises(UserError, match="could not download http://127.0.0.1:9/.*pass --data_file PATH"):
        download_alpaca(tmp_path / "offline.json", url="http://127.0.0.1:9/alpaca_data.json", timeout=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca_data.json"]


def test_script_takes_tokenizer_and_length_from_the_checkpoint(tmp_path, alpaca_json, tok512, monkeypatch):
    spec = importlib.util.spec_from_file_location("prepare_alpaca", ROOT / "scripts" / "prepare_alpaca.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(tmp_path)  # where the default checkpoint (the quick start's) is not, even after a quick start
    with pytest.raises(UserError, match="pass --checkpoint_dir .* or --tokenizer_path"):
        script.main(data_file=alpaca_json)
    checkpoint_dir = tmp_path / "checkpoint"
    checkpoint_dir.mkdir()
    save_config(Config.from_name("tiny"), checkpoint_dir)
    shutil.copyfile(tok512, checkpoint_dir / "tokenizer.model")
    script.main(destination_dir=tmp_path / "data", checkpoint_dir=checkpoint_dir, data_file=alpaca_json,
                val_size=10, skip_bad_records=True)
    config = yaml.safe_load((tmp_path / "data" / "prep_config.yaml").read_text())
    assert config["max_seq_length"] == 128 and config["lengths"]["max"] == 128  # the tiny preset's block_size
    assert config["tokenizer"]["vocab_size"] == 512 and config["train_samples"] == 324


def test_command_line_end_to_end(tmp_path, alpaca_json, llama_tokenizer, capfd):
    # no checkpoint (not even the quick start's default, which a quick start in this folder would have made)
    common = ["--data_file", str(alpaca_json), "--tokenizer_path", str(llama_tokenizer), "--checkpoint_dir", "null",
              "--destination_dir", str(tmp_path), "--val_size", "35"]
    # in this process; the error below comes from the script's own process
    result = run_script_in_this_process("scripts/prepare_alpaca.py", *common, "--skip_bad_records", "true",
                                        capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert f"skipped 1 bad records of {alpaca_json}; the first: record {EMPTY_OUTPUT_RECORD}" in result.stderr
    assert "wrote 299 train and 35 val samples" in result.stdout
    train = torch.load(tmp_path / "train.pt", weights_only=True)
    val = torch.load(tmp_path / "val.pt", weights_only=True)
    assert (len(train), len(val)) == (299, 35)
    assert all(s["input_ids"].dtype == torch.long and s["input_ids"][-1] == 2 for s in train + val)
    config = yaml.safe_load((tmp_path / "prep_config.yaml").read_text())
    assert config["max_seq_length"] == 512 and config["mask_prompt"] is True and config["val_samples"] == 35

    result = run_script("scripts/prepare_alpaca.py", *common)  # the real file holds an empty output
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {alpaca_json}: record {EMPTY_OUTPUT_RECORD} has an empty 'output' (nothing to learn) "
        "(fix it, or pass --skip_bad_records true to leave bad records out)"]
