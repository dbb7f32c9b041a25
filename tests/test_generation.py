"""Generation: compiled vs eager decoding, stopping, sampling, streaming text, and the generate scripts end to end.

The end-to-end tests convert the real 260K TinyStories model with scripts/convert_checkpoint.py and check what
generate/base.py and generate/adapter.py print against the independent NumPy llama2.c forward pass of
tests/test_convert.py.
"""

import copy
import io
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, shared_file
from lit_adapter import generation
from lit_adapter.adapter import AdapterGPT
from lit_adapter.checkpoint import load_model, save_adapter
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.generation import compile_decode, decode_one_token, generate, sample, stream_text
from lit_adapter.model import GPT
from lit_adapter.prompts import alpaca_prompt
from lit_adapter.tokenizer import Tokenizer
from tests.test_convert import Llama2cReference
from tests.test_model import random_model

TINY = Config.from_name("tiny")  # 3 layers, adapters in layers 1 and 2, 4 query heads over 2 kv heads
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


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
    model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + new_tokens)  # as generation.main sizes it

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


# ---------------------------------------------------------------- stopping


class ScriptedModel(nn.Module):
    """Logits that make ``script[p]`` the argmax after the token at position p; records the positions it is fed."""

    def __init__(self, script: list[int], vocab_size: int = 16, cache_length: int = 64) -> None:
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.config = Config.from_name("tiny", vocab_size=vocab_size, block_size=cache_length)
        self.embed = nn.Embedding(vocab_size, 1)
        self.mask_cache = torch.ones(cache_length, cache_length, dtype=torch.bool).tril()
        self.fed: list[list[int]] = []

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        assert idx.shape == (1, input_pos.numel())
        self.fed.append(input_pos.tolist())
        logits = torch.randn(1, idx.size(1), self.vocab_size)
        for t, pos in enumerate(input_pos.tolist()):
            logits[0, t, self.script[pos]] = 100.0
        return logits


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

    tokens = generate(model, prompt, 8, temperature=temperature, top_k=top_k, eos_id=EOS, decode_fn=decode)
    assert list(tokens) == [5, 6, 7, EOS]
    assert model.fed[0] == [0, 1, 2, 3]  # the prompt in one pass, then one position at a time
    assert model.fed[1:] == [[p] for p in range(4, 4 + len(model.fed) - 1)]
    assert len(decode_calls) <= 4  # at most one step computed ahead of the EOS


def test_generate_never_yields_more_than_max_new_tokens():
    model = ScriptedModel([3] * 64)
    prompt = torch.tensor([1, 4])
    for max_new_tokens in (1, 2, 7):
        model.fed.clear()
        assert list(generate(model, prompt, max_new_tokens, temperature=0, eos_id=EOS)) == [3] * max_new_tokens
        assert len(model.fed) == max_new_tokens  # prefill + max_new_tokens - 1 steps: no step wasted
    # EOS exactly at the limit is yielded; EOS after the limit is never reached
    model = ScriptedModel([0, 5, 6, EOS, 7])
    assert list(generate(model, prompt, 3, temperature=0, eos_id=EOS)) == [5, 6, EOS]
    assert list(generate(model, prompt, 2, temperature=0, eos_id=EOS)) == [5, 6]
    assert list(generate(model, prompt, 3, temperature=0, eos_id=None)) == [5, 6, EOS]


def test_generate_stops_at_eos_on_a_real_model():
    model = random_model(GPT, TINY, seed=5)
    prompt = torch.tensor([1, 17, 33, 250])
    model.set_kv_cache(batch_size=1, max_seq_length=64)
    free = list(generate(model, prompt, 40, temperature=0))
    # pick as EOS a token the greedy continuation first produces at step k > 0
    k = next(i for i in range(5, 40) if free[i] not in free[:i])
    assert list(generate(model, prompt, 40, temperature=0, eos_id=free[k])) == free[:k + 1]


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


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> dict:
    """stories260K converted by the conversion script, its tokenizer, and an adapter file with zero gates."""
    stories_bin = shared_file("stories260K/stories260K.bin")  # what the stories260k_bin fixture gives
    out = tmp_path_factory.mktemp("generation") / "stories260K"
    result = run("scripts/convert_checkpoint.py", "--format", "llama2c", "--checkpoint_path", str(stories_bin),
                 "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
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
SPEED = re.compile(r"(\d+) tokens in \d+\.\d\d s: \d+\.\d tokens/s")


def test_generate_base_prints_the_reference_continuation(stories):
    expected, n_tokens = reference_text(stories, "Once upon a time", 50)
    assert n_tokens > 40 and expected.startswith(", there was")
    result = run("generate/base.py", "--checkpoint_dir", str(stories["checkpoint"]), "--prompt", "Once upon a time",
                 "--temperature", "0", "--max_new_tokens", "50")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    lines = result.stderr.splitlines()
    assert any(LOADED.fullmatch(line) for line in lines), result.stderr
    speeds = [m for line in lines if (m := SPEED.fullmatch(line))]
    assert len(speeds) == 1 and int(speeds[0][1]) == n_tokens, result.stderr
    assert "Peak memory" not in result.stderr and "Traceback" not in result.stderr


def test_main_with_num_samples_reuses_the_cache(stories, capsys):
    expected, _ = reference_text(stories, "Once upon a time", 30)
    texts = generation.main(checkpoint_dir=stories["checkpoint"], prompt="Once upon a time", temperature=0,
                            max_new_tokens=30, num_samples=3)
    assert texts == [expected] * 3
    assert capsys.readouterr().out == (expected + "\n") * 3


def test_generate_adapter_with_zero_gates_answers_as_the_base_model(stories, capsys):
    instruction = "Tell me a story about a dog."
    expected, _ = reference_text(stories, alpaca_prompt(instruction), 40)
    base = generation.main(checkpoint_dir=stories["checkpoint"], prompt=alpaca_prompt(instruction), temperature=0,
                           max_new_tokens=40)
    assert base == [expected]
    result = run("generate/adapter.py", "--checkpoint_dir", str(stories["checkpoint"]), "--adapter_path",
                 str(stories["adapter"]), "--prompt", instruction, "--temperature", "0", "--max_new_tokens", "40")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_generate_adapter_refuses_a_prompt_longer_than_the_context(stories):
    result = run("generate/adapter.py", "--checkpoint_dir", str(stories["checkpoint"]), "--adapter_path",
                 str(stories["adapter"]), "--prompt", "once upon a time " * 200, "--max_new_tokens", "10")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert re.fullmatch(r"error: the prompt is \d+ tokens; with max_new_tokens=10 it exceeds the model's context "
                        r"of 512 tokens", errors[0]), errors[0]
    assert "Traceback" not in result.stderr
