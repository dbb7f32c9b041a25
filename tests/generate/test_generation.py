"""Generation: compiled vs eager decoding, stopping, sampling, streaming text, and the generate scripts end to end.

The end-to-end tests convert the real 260K TinyStories model with scripts/convert_checkpoint.py and check what
generate/base.py and generate/adapter.py print against the independent NumPy llama2.c forward pass of
tests/convert/test_convert.py.
"""

import copy
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import (ROOT, convert_in_this_process, run_script, run_script_in_this_process, script_env,
                      shared_file)
from lit_adapter.generate import cli as serving
from lit_adapter.adapter import AdapterConfig, AdapterGPT, adapter_state_dict, is_adapter_param
from lit_adapter.checkpoint import load_model, save_adapter
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.generate.decode import (GraphDecode, StoredDecode, compile_decode, decode_one_token, generate,
                                         generate_batch, stream_text)
from lit_adapter.generate.sampling import sample
from lit_adapter.model import GPT
from lit_adapter.prompts import STYLES
from lit_adapter.tokenizer import Tokenizer
from tests.convert.test_convert import Llama2cReference
from tests.test_model import random_model

alpaca_prompt = STYLES["alpaca"].instruction

# 3 layers, adapters in layers 1 and 2, 4 query heads over 2 kv heads
TINY = AdapterConfig.from_name("tiny", adapter_prompt_length=4, adapter_start_layer=1)


def uncached_greedy(model: GPT, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy continuation by full forward passes over the growing sequence (no KV cache at all)."""
    model = copy.deepcopy(model)
    model.clear_kv_cache()
    idx = prompt[None]
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, prompt.numel():].tolist()


# ---------------------------------------------------------------- compiled decoding


@pytest.mark.parametrize("model_class", [AdapterGPT, GPT])
def test_compiled_greedy_decoding_equals_eager_and_ignores_stale_cache(model_class):
    model = random_model(model_class, TINY, seed=3, gate_scale=1.0)
    if model_class is AdapterGPT:
        assert all(block.attn.adapter_gate.abs().min() > 0 for block in model.blocks[TINY.adapter_start_layer:])
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, TINY.vocab_size, (7,), generator=generator)
    other_prompt = torch.randint(0, TINY.vocab_size, (3,), generator=generator)
    new_tokens = 40
    model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + new_tokens)  # as serving.main sizes it

    eager = list(generate(model, prompt, new_tokens, temperature=0))
    assert len(eager) == new_tokens and len(set(eager)) > 5
    assert eager == uncached_greedy(model, prompt, new_tokens)

    decode = compile_decode()
    assert list(generate(model, prompt, new_tokens, temperature=0, decode_fn=decode)) == eager
    # num_samples: the next generation reuses the same cache (and the same compiled step)
    assert list(generate(model, prompt, new_tokens, temperature=0, decode_fn=decode)) == eager
    # a shorter prompt after a long generation: the cache still holds keys/values of positions it never reaches
    dirty = list(generate(model, other_prompt, 25, temperature=0, decode_fn=decode))
    model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + new_tokens)
    assert dirty == list(generate(model, other_prompt, 25, temperature=0))
    assert dirty == uncached_greedy(model, other_prompt, 25)

    # the captured step (on CPU its replay runs eagerly on the captured buffers), captured again for a new cache
    graph = CountingGraphDecode()
    assert list(generate(model, prompt, new_tokens, temperature=0, decode_fn=graph)) == eager
    assert list(generate(model, other_prompt, 25, temperature=0, decode_fn=graph)) == dirty
    assert graph.captures == 1
    model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + new_tokens)
    assert list(generate(model, prompt, new_tokens, temperature=0, decode_fn=graph)) == eager
    assert graph.captures == 2


def test_stored_decoding_step_is_compiled_once_and_loaded_by_a_later_start(tmp_path, capsys):
    """A stored step greedy-decodes as eagerly; a new StoredDecode (a later start) loads it instead of compiling; the
    same file serves another checkpoint of the same shape; a damaged file is compiled again; another cache length
    is another step."""
    model = random_model(AdapterGPT, TINY, seed=3, gate_scale=1.0)
    prompt = torch.randint(0, TINY.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    model.set_kv_cache(batch_size=1, max_seq_length=48)
    eager = list(generate(model, prompt, 30, temperature=0))

    def stored_run(decode, decoded_model=model):
        decoded_model.set_kv_cache(batch_size=1, max_seq_length=48)
        return list(generate(decoded_model, prompt, 30, temperature=0, decode_fn=decode))

    assert stored_run(StoredDecode(tmp_path)) == eager
    err = capsys.readouterr().err
    assert "Compiling the decoding step" in err and re.search(r"Compiled in \d+ s and stored: later runs load it", err)
    [path] = tmp_path.iterdir()
    assert stored_run(StoredDecode(tmp_path)) == eager
    other = random_model(AdapterGPT, TINY, seed=4, gate_scale=1.0)  # other weights: the stored step takes them in
    other.set_kv_cache(batch_size=1, max_seq_length=48)
    other_eager = list(generate(other, prompt, 30, temperature=0))
    assert other_eager != eager
    assert stored_run(StoredDecode(tmp_path), other) == other_eager
    assert capsys.readouterr().err == "" and list(tmp_path.iterdir()) == [path]

    path.write_bytes(path.read_bytes()[:1000])
    assert stored_run(StoredDecode(tmp_path)) == eager
    assert "does not fit" in capsys.readouterr().err and path.stat().st_size > 1000

    model.set_kv_cache(batch_size=1, max_seq_length=64)
    assert list(generate(model, prompt, 30, temperature=0, decode_fn=StoredDecode(tmp_path))) == eager
    assert len(list(tmp_path.iterdir())) == 2


def test_a_step_that_cannot_be_written_serves_the_run_with_a_note(tmp_path, capsys):
    model = random_model(AdapterGPT, TINY, seed=3, gate_scale=1.0)
    prompt = torch.randint(0, TINY.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    model.set_kv_cache(batch_size=1, max_seq_length=48)
    eager = list(generate(model, prompt, 20, temperature=0))
    (tmp_path / "file").write_text("not a folder")
    assert list(generate(model, prompt, 20, temperature=0, decode_fn=StoredDecode(tmp_path / "file"))) == eager
    assert "the compiled decoding step serves this run only: cannot write" in capsys.readouterr().err


def test_a_step_that_fails_to_compile_for_storing_runs_uncompiled_by_default(tmp_path, capsys, monkeypatch):
    class Unstorable:
        def aot_compile(self, example):
            raise RuntimeError("this kernel cannot be serialized\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: Unstorable())
    model = random_model(AdapterGPT, TINY, seed=3, gate_scale=1.0)
    prompt = torch.randint(0, TINY.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    model.set_kv_cache(batch_size=1, max_seq_length=48)
    eager = list(generate(model, prompt, 20, temperature=0))
    stored = StoredDecode(tmp_path, compile_unstorable=False)
    assert list(generate(model, prompt, 20, temperature=0, decode_fn=stored)) == eager
    assert ("cannot be stored (compiling it to store failed: RuntimeError: this kernel cannot be serialized); it runs "
            "uncompiled") in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_one_stored_step_serves_every_temperature_top_k_and_top_p(tmp_path):
    """The sampling options are inputs of the stored step, not constants: sampling with top_k 1 at two temperatures
    (and two top_p) answers as greedy decoding from one stored file; sampling without filters is a second kind."""
    model = random_model(AdapterGPT, TINY, seed=3, gate_scale=1.0)
    prompt = torch.randint(0, TINY.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    model.set_kv_cache(batch_size=1, max_seq_length=48)
    greedy = list(generate(model, prompt, 20, temperature=0))
    stored = StoredDecode(tmp_path)
    for temperature, top_p in ((0.7, 1.0), (1.6, 0.9)):
        assert list(generate(model, prompt, 20, temperature, top_k=1, top_p=top_p, decode_fn=stored)) == greedy
    assert len(list(tmp_path.iterdir())) == 1
    torch.manual_seed(0)
    sampled = list(generate(model, prompt, 20, temperature=5.0, decode_fn=StoredDecode(tmp_path)))
    assert sampled != greedy and len(list(tmp_path.iterdir())) == 2


def test_a_quantized_step_that_cannot_be_stored_is_compiled_for_the_run(tmp_path, capsys):
    pytest.importorskip("torchao", reason="int8-base needs torchao")
    from lit_adapter.quantize.low_bit import quantize_int8
    model = random_model(AdapterGPT, TINY, seed=3, gate_scale=1.0).requires_grad_(False)
    for block in model.blocks:
        quantize_int8(block)
    prompt = torch.randint(0, TINY.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    model.set_kv_cache(batch_size=1, max_seq_length=48)
    eager = list(generate(model, prompt, 20, temperature=0))
    assert list(generate(model, prompt, 20, temperature=0, decode_fn=StoredDecode(tmp_path))) == eager
    assert "cannot be stored (compiling it to store failed: NotImplementedError" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_pytorch_that_cannot_store_steps_compiles_in_the_run_where_asked_else_runs_uncompiled(tmp_path, capsys,
                                                                                               monkeypatch):
    monkeypatch.delattr(torch.compiler, "load_compiled_function")
    model = random_model(AdapterGPT, TINY, seed=3, gate_scale=1.0)
    prompt = torch.randint(0, TINY.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    model.set_kv_cache(batch_size=1, max_seq_length=48)
    eager = list(generate(model, prompt, 20, temperature=0))
    for compile_unstorable, then in ((True, "it is compiled for this run only"), (False, "it runs uncompiled")):
        stored = StoredDecode(tmp_path, compile_unstorable)
        assert list(generate(model, prompt, 20, temperature=0, decode_fn=stored)) == eager
        assert f"cannot store it (newer versions can)); {then}" in capsys.readouterr().err
        assert isinstance(next(iter(stored.steps.values())), GraphDecode) != compile_unstorable
    assert not list(tmp_path.iterdir())


class CountingGraphDecode(GraphDecode):
    def __init__(self) -> None:
        super().__init__()
        self.captures = 0

    def capture(self, *args):
        self.captures += 1
        return super().capture(*args)


# ---------------------------------------------------------------- batches and several adapters


def random_adapters(model: AdapterGPT, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` adapters for ``model`` with random prompts and clearly non-zero gates."""
    generator = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(t.shape, generator=generator) for name, t in adapter_state_dict(model).items()}
            for _ in range(n)]


def alone(model: AdapterGPT, adapter: dict[str, torch.Tensor] | None) -> GPT:
    """A separate model holding only ``adapter`` as its own parameters (None: a plain base model)."""
    base = {k: v for k, v in model.state_dict().items() if not is_adapter_param(k)}
    single = GPT(model.config) if adapter is None else AdapterGPT(model.config)
    single.load_state_dict({**base, **(adapter or {})})
    return single.eval()


def one_by_one(models: list[GPT], prompts: list[torch.Tensor], new_tokens: int) -> list[list[int]]:
    outputs = []
    for model, prompt in zip(models, prompts):
        model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + new_tokens)
        outputs.append(list(generate(model, prompt, new_tokens, temperature=0)))
    return outputs


PROMPT_LENGTHS = [7, 1, 12, 3, 9]


def random_prompts(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=generator) for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("model_class", [AdapterGPT, GPT])
def test_batched_greedy_equals_one_by_one_for_prompts_of_different_lengths(model_class):
    model = random_model(model_class, TINY, seed=4)
    prompts = random_prompts(seed=1)
    new_tokens = 30
    expected = one_by_one([model] * len(prompts), prompts, new_tokens)
    assert all(len(set(tokens)) > 5 for tokens in expected)
    model.set_kv_cache(batch_size=len(prompts), max_seq_length=max(PROMPT_LENGTHS) + new_tokens)
    assert generate_batch(model, prompts, new_tokens, temperature=0) == expected
    # the logits, too: the right-padded prefill and one step with each row at its own position
    T = max(PROMPT_LENGTHS)
    padded = torch.stack([torch.cat([p, torch.zeros(T - p.numel(), dtype=torch.long)]) for p in prompts])
    next_tokens = torch.tensor([[tokens[0]] for tokens in expected])
    with torch.no_grad():
        prefill = model(padded, torch.arange(T))
        step = model(next_tokens, torch.tensor(PROMPT_LENGTHS)[:, None])
        for row, prompt in enumerate(prompts):
            model.set_kv_cache(batch_size=1, max_seq_length=T + 1)
            alone = model(prompt[None], torch.arange(prompt.numel()))[0]
            torch.testing.assert_close(prefill[row, :prompt.numel()], alone)
            torch.testing.assert_close(step[row], model(next_tokens[row:row + 1], torch.tensor([prompt.numel()]))[0])


def test_batch_stops_each_row_at_its_own_stop_id_and_limit():
    model = random_model(GPT, TINY, seed=4)
    prompts = random_prompts(seed=1)[:3]
    free = one_by_one([model] * 3, prompts, 20)
    stop = free[0][6]  # row 0 stops at its 7th token; rows 1 and 2 where this token comes, if it does
    # each row's prompt + its own limit fits (7 + 20, 1 + 20, 12 + 4), the longest prompt + the largest limit does not
    model.set_kv_cache(batch_size=3, max_seq_length=27)
    out = generate_batch(model, prompts, [20, 20, 4], temperature=0, stop_ids={stop, 10_000})
    for row, (tokens, limit) in enumerate(zip(free, [20, 20, 4])):
        end = min(tokens.index(stop) + 1 if stop in tokens else limit, limit)
        assert out[row] == tokens[:end], row
    assert len(out[0]) == free[0].index(stop) + 1 <= 7 and len(out[2]) == 4
    with pytest.raises(UserError, match=r"prompt \(12 tokens\) \+ max_new_tokens \(16\) exceed the KV cache \(27\)"):
        generate_batch(model, prompts, [20, 20, 16], temperature=0)


def test_a_batch_mixing_adapters_and_the_base_equals_each_alone():
    model = random_model(AdapterGPT, TINY, seed=6)
    adapters = random_adapters(model, 3, seed=2)
    prompts = random_prompts(seed=3)
    rows = [2, 0, 3, 1, 2]  # 3: the base model
    new_tokens = 25
    singles = [alone(model, adapters[i] if i < 3 else None) for i in range(4)]
    expected = one_by_one([singles[i] for i in rows], prompts, new_tokens)
    assert len({tuple(expected[0]), tuple(expected[4])}) == 2  # same adapter, different prompts
    assert len({tuple(one_by_one([m], prompts[:1], 10)[0]) for m in singles}) == 4  # the adapters really differ

    model.register_adapters(adapters)
    assert model.n_adapters == 3
    model.set_kv_cache(batch_size=len(prompts), max_seq_length=max(PROMPT_LENGTHS) + new_tokens)
    batched = {}
    for name, decode_fn in [("eager", decode_one_token), ("graph", GraphDecode()), ("compiled", compile_decode())]:
        model.select_adapters(rows)
        batched[name] = generate_batch(model, prompts, new_tokens, temperature=0, decode_fn=decode_fn)
        assert batched[name] == expected, name
    # another batch on the same cache: other adapters per row
    model.select_adapters([3, 3, 1, 0, 0])
    assert generate_batch(model, prompts, new_tokens, temperature=0) == one_by_one(
        [singles[i] for i in [3, 3, 1, 0, 0]], prompts, new_tokens)
    with pytest.raises(UserError, match=r"adapter indices \[0, 4\] out of range: 3 adapters, 3 is the base model"):
        model.select_adapters([0, 4])



# ---------------------------------------------------------------- stopping


class ScriptedModel(nn.Module):
    """Logits that make ``script[p]`` the argmax after the token at position p; records the positions it is fed."""

    def __init__(self, script: list[int], vocab_size: int = 16, cache_length: int = 64) -> None:
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.config = Config.from_name("tiny", vocab_size=vocab_size, block_size=cache_length)
        self.embed = nn.Embedding(vocab_size, 1)
        self.cache_positions = torch.arange(cache_length)
        self.fed: list[list[int]] = []

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, logits_at=None, view=None) -> torch.Tensor:
        assert idx.shape == (1, input_pos.numel())
        self.fed.append(input_pos.flatten().tolist())
        logits = torch.randn(1, idx.size(1), self.vocab_size)
        for t, pos in enumerate(input_pos.flatten().tolist()):
            logits[0, t, self.script[pos]] = 100.0
        return logits if logits_at is None else logits[logits_at]


EOS = 2


@pytest.mark.parametrize("temperature, top_k", [(0, None), (0.8, 5), (1.0, None)])
def test_generate_stops_right_after_eos(temperature, top_k):
    prompt = torch.tensor([1, 9, 9, 9])
    continuation = [5, 6, 7, EOS, 8, 9, EOS, 10]
    model = ScriptedModel([0] * 3 + continuation + [11] * 40)
    decode_calls = []

    def decode(*args):
        decode_calls.append(args[2].item())
        return decode_one_token(*args)

    tokens = generate(model, prompt, 8, temperature=temperature, top_k=top_k, stop_ids={EOS}, decode_fn=decode)
    assert list(tokens) == [5, 6, 7, EOS]
    assert model.fed[0] == [0, 1, 2, 3]  # the prompt in one pass, then one position at a time
    assert model.fed[1:] == [[p] for p in range(4, 4 + len(model.fed) - 1)]
    assert len(decode_calls) <= 4  # at most one step computed ahead of the EOS


def test_generate_never_yields_more_than_max_new_tokens():
    model = ScriptedModel([3] * 64)
    prompt = torch.tensor([1, 4])
    for max_new_tokens in (1, 2, 7):
        model.fed.clear()
        assert list(generate(model, prompt, max_new_tokens, temperature=0, stop_ids={EOS})) == [3] * max_new_tokens
        assert len(model.fed) == max_new_tokens  # prefill + max_new_tokens - 1 steps: no step wasted
    # EOS exactly at the limit is yielded; EOS after the limit is never reached
    model = ScriptedModel([0, 5, 6, EOS, 7])
    assert list(generate(model, prompt, 3, temperature=0, stop_ids={EOS})) == [5, 6, EOS]
    assert list(generate(model, prompt, 2, temperature=0, stop_ids={EOS})) == [5, 6]
    assert list(generate(model, prompt, 3, temperature=0, stop_ids=())) == [5, 6, EOS]


def test_generate_stops_at_eos_on_a_real_model():
    model = random_model(GPT, TINY, seed=5)
    prompt = torch.tensor([1, 17, 33, 250])
    model.set_kv_cache(batch_size=1, max_seq_length=64)
    free = list(generate(model, prompt, 40, temperature=0))
    # pick as EOS a token the greedy continuation first produces at step k > 0
    k = next(i for i in range(5, 40) if free[i] not in free[:i])
    assert list(generate(model, prompt, 40, temperature=0, stop_ids={free[k]})) == free[:k + 1]


def test_generate_refuses_more_tokens_than_the_cache_holds():
    model = random_model(GPT, TINY, seed=5)
    prompt = torch.arange(1, 11)
    model.set_kv_cache(batch_size=1, max_seq_length=16)
    with pytest.raises(UserError, match=r"prompt \(10 tokens\) \+ max_new_tokens \(7\) exceed the KV cache \(16\)"):
        list(generate(model, prompt, 7, temperature=0))
    assert len(list(generate(model, prompt, 6, temperature=0))) == 6
    model.clear_kv_cache()
    with pytest.raises(UserError, match="exceed the KV cache"):
        list(generate(model, prompt, 1, temperature=0))


# ---------------------------------------------------------------- sampling


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, f"sampled ids outside the support: {counts}"
    return (((counts - expected)[support] ** 2) / expected[support]).sum().item()


# the 99.99% quantiles of chi-square with 1, 2, 3 degrees of freedom
CHI2_CRITICAL = {1: 15.14, 2: 18.42, 3: 21.11}
DRAWS = 20_000


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0)) * 3
    argmax = logits.argmax(-1, keepdim=True)
    torch.manual_seed(0)
    assert torch.equal(sample(logits, temperature=0), argmax)
    assert torch.equal(sample(logits, temperature=0, top_k=50, top_p=0.5), argmax)
    assert torch.equal(sample(logits.bfloat16(), temperature=0), logits.bfloat16().argmax(-1, keepdim=True))
    for temperature in (0.01, 0.7, 1.0, 5.0, 100.0):
        for top_p in (1.0, 0.3):
            assert torch.equal(sample(logits, temperature, top_k=1, top_p=top_p), argmax)
    assert sample(logits, temperature=0).shape == (64, 1) and sample(logits).dtype == torch.long


def test_top_k_restricts_the_support_to_the_k_best():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    for k in (2, 5, 17):
        torch.manual_seed(k)
        drawn = set(sample(logits.expand(DRAWS, -1), temperature=3.0, top_k=k).flatten().tolist())
        assert drawn == set(logits[0].topk(k).indices.tolist())  # all of them, and only they
    torch.manual_seed(0)
    assert len(set(sample(logits.expand(DRAWS, -1), temperature=3.0, top_k=500).flatten().tolist())) == 50


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # rows with the ids in different orders: the kept set follows the probabilities, not the positions
    orders = [torch.tensor(o) for o in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0])]
    for top_p, kept in [(0.3, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (0.97, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        for order in orders:
            logits = probs.log()[order]  # position i holds token order[i]
            torch.manual_seed(0)
            drawn = set(sample(logits.expand(DRAWS // 4, -1), temperature=1.0, top_p=top_p).flatten().tolist())
            assert {order[i].item() for i in drawn} == kept, (top_p, order)
    # a batch whose rows differ: each row keeps its own set
    rows = torch.stack([probs.log()[order] for order in orders]).repeat(2000, 1)
    drawn = sample(rows, temperature=1.0, top_p=0.7).view(2000, len(orders))
    for column, order in enumerate(orders):
        assert {order[i].item() for i in drawn[:, column].tolist()} == {0, 1}


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(256, 40, generator=torch.Generator().manual_seed(2))
    draws = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        draws.append(torch.cat([sample(logits, 0.9, top_k=20, top_p=0.95) for _ in range(3)]))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_frequencies_follow_the_tempered_softmax(temperature):
    logits = torch.tensor([[1.2, 0.3, -0.4, 0.8]])
    torch.manual_seed(0)
    drawn = sample(logits.expand(DRAWS, -1), temperature=temperature)
    assert chi_square(drawn, (logits[0] / temperature).softmax(-1)) < CHI2_CRITICAL[3]


@pytest.mark.parametrize("top_k, top_p, kept", [(2, 1.0, [0, 3]), (None, 0.7, [0, 3]), (3, 0.8, [0, 3]),
                                                (3, 0.99, [0, 1, 3])])
def test_sample_frequencies_renormalise_over_the_kept_tokens(top_k, top_p, kept):
    logits = torch.tensor([[1.2, 0.3, -0.4, 0.8]])  # softmax: 0.45, 0.18, 0.09, 0.30
    expected = torch.zeros(4)
    expected[kept] = logits[0, kept].softmax(-1)
    torch.manual_seed(1)
    drawn = sample(logits.expand(DRAWS, -1), temperature=1.0, top_k=top_k, top_p=top_p)
    assert chi_square(drawn, expected) < CHI2_CRITICAL[len(kept) - 1]


# ---------------------------------------------------------------- streaming text


class RecordingStringIO(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.mark.parametrize("text", ["Llamas 🦙 say 你好, naïve café — 😀👍🏽 done", "你好世界", "🦙", " leading space",
                                  "tabs\tand\nnewlines  twice", "ends in a partial emoji"])
def test_stream_text_prints_exactly_the_decoded_text(llama_tokenizer, text):
    tokenizer = Tokenizer(llama_tokenizer)
    ids = tokenizer.encode(text, bos=False).tolist()
    if text == "ends in a partial emoji":
        ids += tokenizer.encode("😀", bos=False).tolist()[:-1]  # generation may stop inside a character
    elif any(ord(c) > 0xFFFF for c in text):
        assert any(tokenizer.backend.processor.IdToPiece(i).startswith("<0x") for i in ids)  # byte-fallback tokens
    out = RecordingStringIO()
    printed_before = []

    def tokens():
        for token in ids + [tokenizer.eos_id, *ids[:3]]:
            printed_before.append(out.getvalue())
            yield token
        raise AssertionError("stream_text read past EOS")

    assert stream_text(tokenizer, tokens(), out) == ids
    final = tokenizer.decode(ids)
    assert out.getvalue() == final + "\n"
    if "partial" not in text:
        assert final == text.lstrip(" ") or final == text
        assert all("\ufffd" not in w for w in out.writes)  # no half characters ever shown
    for n, printed in enumerate(printed_before[:len(ids) + 1]):
        assert final.startswith(printed)
        settled = tokenizer.decode(ids[:n])
        if not settled.endswith("\ufffd"):
            assert printed == settled  # streamed as soon as the characters are complete


def test_stream_text_defaults_to_stdout(tok512, capsys):
    tokenizer = Tokenizer(tok512)
    ids = tokenizer.encode("Once upon a time", bos=False).tolist()
    assert stream_text(tokenizer, iter(ids)) == ids
    assert capsys.readouterr().out == "Once upon a time\n"


# ---------------------------------------------------------------- the scripts on the real 260K model


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> dict:
    """stories260K converted by the conversion script's command line (in this process: tests/convert/test_convert.py runs
    it in its own), its tokenizer, and an adapter file with zero gates."""
    stories_bin = shared_file("stories260K/stories260K.bin")  # what the stories260k_bin fixture gives
    out = tmp_path_factory.mktemp("generation") / "stories260K"
    convert_in_this_process("--format", "llama2c", "--checkpoint_path", str(stories_bin), "--output_dir", str(out))
    model = load_model(out, adapter=True)  # fresh adapter: random prompts, zero gates
    assert all(block.attn.adapter_gate.abs().sum() == 0 for block in model.blocks[model.config.adapter_start_layer:])
    assert model.blocks[-1].attn.adapter_prompt.abs().sum() > 0
    save_adapter(out.parent / "zero_gates.safetensors", model, model.config)
    return {"bin": stories_bin, "checkpoint": out, "adapter": out.parent / "zero_gates.safetensors",
            "tokenizer": Tokenizer(out)}


def reference_text(stories: dict, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """The greedy continuation by the NumPy llama2.c forward pass: its text up to EOS, and its token count."""
    tokenizer = stories["tokenizer"]
    tokens, _ = Llama2cReference(stories["bin"]).greedy(tokenizer.encode(prompt, bos=True).tolist(), max_new_tokens)
    if tokenizer.eos_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_id)]
    return tokenizer.decode(tokens), len(tokens)


LOADED = re.compile(r"Loaded \S+ in \d+\.\d\d s")
SPEED = re.compile(r"(\d+) tokens in \d+\.\d\d s: the first after \d+\.\d\d s, then \d+\.\d tokens/s")


def test_generate_base_prints_the_reference_continuation(stories):
    expected, n_tokens = reference_text(stories, "Once upon a time", 50)
    assert n_tokens > 40 and expected.startswith(", there was")
    result = run_script("generate/base.py", "--checkpoint_dir", str(stories["checkpoint"]), "--prompt",
                        "Once upon a time", "--temperature", "0", "--max_new_tokens", "50")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    lines = result.stderr.splitlines()
    assert any(LOADED.fullmatch(line) for line in lines), result.stderr
    speeds = [m for line in lines if (m := SPEED.fullmatch(line))]
    assert len(speeds) == 1 and int(speeds[0][1]) == n_tokens, result.stderr
    assert "Peak memory" not in result.stderr and "Traceback" not in result.stderr


def test_the_speed_line_separates_the_first_tokens_wait_from_the_decoding_speed():
    arrivals = [12.0, 12.5, 13.0, 13.5, 14.0]  # a stored step loaded before the first token, then 2 tokens a second
    after = "the first after 2.00 s, then 2.0 tokens/s"
    assert serving.speed_line(5, 10.0, arrivals, 14.2) == f"5 tokens in 4.20 s: {after}"
    assert serving.speed_line(4, 10.0, arrivals, 14.2) == f"4 tokens in 4.20 s: {after}"  # a stop token came fifth
    assert serving.speed_line(1, 10.0, arrivals[:2], 12.1) == "1 token in 2.10 s: the first after 2.00 s"
    assert serving.speed_line(0, 10.0, [12.0], 12.1) == "0 tokens in 2.10 s"  # the stop token came first
    arrived = []
    assert list(serving.clocked(iter([7, 8]), arrived)) == [7, 8] and len(arrived) == 2 and arrived[0] <= arrived[1]


def test_main_with_num_samples_reuses_the_cache(stories, capsys):
    expected, _ = reference_text(stories, "Once upon a time", 30)
    texts = serving.main(checkpoint_dir=stories["checkpoint"], prompt="Once upon a time", temperature=0,
                            max_new_tokens=30, num_samples=3)
    assert texts == [expected] * 3
    assert capsys.readouterr().out == (expected + "\n") * 3


def test_the_default_decoding_step_is_the_stored_one_on_a_gpu_for_a_prompt_or_a_chat(tmp_path):
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    default = serving.decode_step(None, tmp_path, True, gpu, batches=False)
    assert isinstance(default, StoredDecode) and default.folder == tmp_path and not default.compile_unstorable
    assert type(serving.decode_step(None, tmp_path, True, gpu, batches=True)) is GraphDecode  # buckets of calls
    assert type(serving.decode_step(False, tmp_path, True, gpu, batches=False)) is GraphDecode
    assert serving.decode_step(None, tmp_path, False, gpu, batches=False) is decode_one_token  # no CUDA graph
    assert serving.decode_step(None, tmp_path, True, cpu, batches=False) is decode_one_token
    asked = serving.decode_step(True, tmp_path, True, cpu, batches=True)
    assert isinstance(asked, StoredDecode) and asked.compile_unstorable
    assert type(serving.decode_step(None, None, True, gpu, batches=False)) is GraphDecode  # nothing to store in
    in_the_run = serving.decode_step(True, None, True, gpu, batches=False)  # nothing stored: compiled in the run
    assert not isinstance(in_the_run, (StoredDecode, GraphDecode)) and in_the_run is not decode_one_token


def test_compile_true_stores_the_step_and_later_runs_of_other_prompts_load_it(stories, tmp_path, capsys):
    def run(prompt):
        texts = serving.main(checkpoint_dir=stories["checkpoint"], prompt=prompt, temperature=0, max_new_tokens=30,
                             compile=True, compiled_steps=tmp_path)
        assert texts == [reference_text(stories, prompt, 30)[0]]
        return capsys.readouterr().err

    assert "Compiling the decoding step" in run("Once upon a time")
    assert "Compiling" not in run("The little dog ran")  # another prompt length, the same rounded cache
    assert len(list(tmp_path.iterdir())) == 1


def test_generate_adapter_with_zero_gates_answers_as_the_base_model(stories, capfd):
    instruction = "Tell me a story about a dog."
    expected, _ = reference_text(stories, alpaca_prompt(instruction), 40)
    base = serving.main(checkpoint_dir=stories["checkpoint"], prompt=alpaca_prompt(instruction), temperature=0,
                           max_new_tokens=40)
    assert base == [expected]
    # in this process: the script answers as its own process in the requests-file test below
    result = run_script_in_this_process("generate/adapter.py", "--checkpoint_dir", str(stories["checkpoint"]),
                                        "--adapter_path", str(stories["adapter"]), "--prompt", instruction,
                                        "--temperature", "0", "--max_new_tokens", "40", capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_generate_adapter_refuses_a_prompt_longer_than_the_context(stories, capfd):
    # in this process: the script refuses bad input as its own process in the wrong-adapter test below
    result = run_script_in_this_process("generate/adapter.py", "--checkpoint_dir", str(stories["checkpoint"]),
                                        "--adapter_path", str(stories["adapter"]), "--prompt",
                                        "once upon a time " * 200, "--max_new_tokens", "10", capfd=capfd)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert re.fullmatch(r"error: the prompt is \d+ tokens; with max_new_tokens=10 it exceeds the model's context "
                        r"of 512 tokens", errors[0]), errors[0]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- several adapters, request files, chat


@pytest.fixture(scope="module")
def story_adapter(stories) -> Path:
    """An adapter for stories260K with random, clearly non-zero gates (answers differ from the base model's)."""
    torch.manual_seed(0)
    model = load_model(stories["checkpoint"], adapter=True)
    with torch.no_grad():
        for attn in model.adapted_layers():
            attn.adapter_gate.normal_(0.0, 2.0)
    path = stories["checkpoint"].parent / "story.safetensors"
    save_adapter(path, model, model.config)
    return path


def test_a_requests_file_with_several_adapters_equals_answering_one_by_one(stories, story_adapter, tmp_path):
    zero = tmp_path / "zero.safetensors"
    shutil.copyfile(stories["adapter"], zero)
    paths = {"story": story_adapter, "zero": zero, None: None}
    requests = [{"prompt": "Tell me a story about a dog.", "adapter": "story"},
                {"prompt": "Write about the sea.", "adapter": "zero", "max_new_tokens": 12},
                {"prompt": "Once upon a time"},
                {"prompt": "Lily had a red ball.", "adapter": "story", "max_new_tokens": 40},
                {"prompt": "Tell me a story about a dog.", "adapter": "story", "temperature": 0.9, "top_k": 20},
                {"prompt": "Once upon a time there was", "adapter": None}]
    requests_path = tmp_path / "requests.jsonl"
    requests_path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    output = tmp_path / "answers.jsonl"
    result = run_script("generate/adapter.py", "--checkpoint_dir", str(stories["checkpoint"]), "--adapter_path",
                        str(story_adapter), str(zero), "--requests_path", str(requests_path), "--output_path",
                        str(output), "--batch_size", "3", "--temperature", "0", "--max_new_tokens", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and re.search(r"6 requests, \d+ tokens in", result.stderr), result.stderr
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [a["prompt"] for a in answers] == [r["prompt"] for r in requests]
    assert [a["adapter"] for a in answers] == [r.get("adapter") for r in requests]
    assert [a["max_new_tokens"] for a in answers] == [30, 12, 30, 40, 30, 30]
    assert answers[4]["temperature"] == 0.9 and answers[4]["top_k"] == 20 and answers[4]["num_tokens"] > 0
    for request, answer in zip(requests, answers):
        if "temperature" in request:
            continue
        alone = serving.main(checkpoint_dir=stories["checkpoint"], adapter_path=paths[request.get("adapter")],
                                prompt=request["prompt"], temperature=0,
                                max_new_tokens=request.get("max_new_tokens", 30))
        assert answer["response"] == alone[0], request
    # zero gates answer as the base model does on the Alpaca text; the other adapter differs
    assert answers[1]["response"] == reference_text(stories, alpaca_prompt("Write about the sea."), 12)[0]
    assert answers[0]["response"] != reference_text(stories, alpaca_prompt("Tell me a story about a dog."), 30)[0]
    assert answers[2]["response"] == reference_text(stories, "Once upon a time", 30)[0]


def test_a_wrong_adapter_among_several_gives_one_line_and_exit_1(stories, story_adapter, tmp_path, capfd):
    tiny_adapter = tmp_path / "tiny.safetensors"
    save_adapter(tiny_adapter, AdapterGPT(TINY), TINY)
    shorter_config = AdapterConfig.of(load_model(stories["checkpoint"]).config, adapter_prompt_length=3)
    start = shorter_config.adapter_start_layer
    shorter = tmp_path / "shorter.safetensors"
    save_adapter(shorter, AdapterGPT(shorter_config), shorter_config)
    requests_path = tmp_path / "requests.jsonl"
    requests_path.write_text('{"prompt": "hi", "adapter": "story"}\n{"prompt": "hi", "adapter": "nope"}\n')
    cases = [
        ([str(story_adapter), str(tiny_adapter)],
         rf"error: {tiny_adapter} was trained for base tiny but the checkpoint is stories260K: n_layer 3 vs 5, "
         r"n_head 4 vs 8, n_kv_head 2 vs 4, n_embd 32 vs 64, intermediate_size 64 vs 172, "
         r"tie_embeddings False vs True"),
        ([str(story_adapter), str(shorter)],
         rf"error: {shorter} has adapter shape \{{'adapter_prompt_length': 3, 'adapter_start_layer': {start}\}} but "
         rf"{story_adapter} has \{{'adapter_prompt_length': 10, 'adapter_start_layer': {start}\}}: adapters served together "
         r"need the same shape"),
        ([str(story_adapter), str(stories["adapter"]), "--requests_path", str(requests_path)],
         r"error: unknown adapter 'nope'; loaded: story, zero_gates"),
        ([str(story_adapter), "--adapter", "zero"], r"error: unknown adapter 'zero'; loaded: story"),
    ]
    bad_lines = [('{"prompt": "hi", "temperature": "hot"}', r"temperature must be numbers \(max_new_tokens and top_k "
                  r"whole numbers\)"),
                 ('{"prompt": "hi", "top_k": 2.5}',
                  r"top_k must be numbers \(max_new_tokens and top_k whole numbers\)"),
                 ('{"prompt": "hi", "max_tokens": 5}', r"unknown keys \['max_tokens'\]; known: prompt, adapter, "
                  r"max_new_tokens, temperature, top_k, top_p"),
                 ('{"prompt": "hi"', r"is not JSON: .*"),
                 ('["hi"]', r'expected a JSON object with a "prompt"'),
                 ('{"prompt": "hi", "max_new_tokens": 0}', r"max_new_tokens must be at least 1")]
    for number, (line, message) in enumerate(bad_lines):
        bad = tmp_path / f"bad{number}.jsonl"
        bad.write_text('{"prompt": "fine"}\n' + line + "\n")
        cases.append(([str(story_adapter), "--requests_path", str(bad)], rf"error: {bad} line 2:? {message}"))
    for i, (args, message) in enumerate(cases):  # the first as its own process, the rest in this one (faster)
        command = ("generate/adapter.py", "--checkpoint_dir", str(stories["checkpoint"]), "--adapter_path", *args)
        result = run_script(*command) if i == 0 else run_script_in_this_process(*command, capfd=capfd)
        assert result.returncode == 1 and result.stdout == "", result.stderr
        assert re.fullmatch(message, result.stderr.strip()), result.stderr


def test_interactive_chat_keeps_the_conversation_in_the_prompt_style(stories, monkeypatch, capsys):
    first, second = "Tell me a story about a cat.", "What did the cat eat?"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{first}\n{second}\n\nnot read\n"))
    replies = serving.main(checkpoint_dir=stories["checkpoint"], adapter_path=stories["adapter"], interactive=True,
                              temperature=0, max_new_tokens=25)
    # zero gates: the base model's greedy continuation of the whole conversation in the Alpaca style
    expected_first = reference_text(stories, alpaca_prompt(first), 25)[0]
    conversation = alpaca_prompt(first) + expected_first + "\n\n" + alpaca_prompt(second)
    expected_second = reference_text(stories, conversation, 25)[0]
    assert replies == [expected_first, expected_second] and expected_first != expected_second
    assert capsys.readouterr().out == f"{expected_first}\n{expected_second}\n"


def test_a_chat_message_that_is_not_utf8_is_one_line_under_any_locale(stories):
    """Typed bytes are read as UTF-8 whatever the locale says (here ASCII, strict): Latin-1 "é" is refused."""
    command = [sys.executable, "generate/base.py", "--checkpoint_dir", str(stories["checkpoint"]), "--interactive",
               "true", "--max_new_tokens", "3"]
    env = {**script_env(), "LC_ALL": "C", "PYTHONIOENCODING": "ascii:strict", "PYTHONUTF8": "0"}
    result = subprocess.run(command, cwd=ROOT, env=env, input="caf\xe9\n".encode("latin-1"), capture_output=True,
                            timeout=120)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == ("error: the message typed is not UTF-8 text (byte 3): type UTF-8, or "
                                                "set a UTF-8 locale")


def test_chat_drops_the_oldest_exchange_beyond_chat_context(stories, monkeypatch):
    first, second = "Tell me a story about a cat.", "What did the cat eat?"
    n_tokens = lambda text: stories["tokenizer"].encode(text, bos=True).numel()  # noqa: E731
    expected_first = reference_text(stories, alpaca_prompt(first), 25)[0]
    context = max(n_tokens(alpaca_prompt(first)), n_tokens(alpaca_prompt(second))) + 25
    conversation = alpaca_prompt(first) + expected_first + "\n\n" + alpaca_prompt(second)
    assert n_tokens(conversation) + 25 > context  # the whole conversation does not fit: the first exchange goes
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{first}\n{second}\n\n"))
    replies = serving.main(checkpoint_dir=stories["checkpoint"], adapter_path=stories["adapter"], interactive=True,
                           temperature=0, max_new_tokens=25, chat_context=context)
    alone = reference_text(stories, alpaca_prompt(second), 25)[0]
    assert replies == [expected_first, alone] and alone != reference_text(stories, conversation, 25)[0]


@pytest.mark.parametrize("precision", ["int8-base", "nf4-base"])
def test_a_quantized_base_answers_a_batch_of_adapters_as_each_alone(stories, story_adapter, tmp_path, precision):
    requests = [{"prompt": "Tell me a story about a dog.", "adapter": "story"}, {"prompt": "Once upon a time"},
                {"prompt": "Lily had a red ball.", "adapter": "story"}]
    requests_path, output = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests_path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    options = {"checkpoint_dir": stories["checkpoint"], "temperature": 0, "max_new_tokens": 20, "precision": precision}
    serving.main(adapter_path=[story_adapter], requests_path=requests_path, output_path=output, batch_size=3,
                 **options)
    answers = [json.loads(line)["response"] for line in output.read_text().splitlines()]
    alone = [serving.main(adapter_path=story_adapter if r.get("adapter") else None, prompt=r["prompt"], **options)[0]
             for r in requests]
    assert answers == alone and answers[0] != answers[1]
