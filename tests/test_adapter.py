"""LLaMA-Adapter: the paper's equation, zero-init gating, what trains, gradients, adapter files and checkpoint dirs."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lit_adapter.adapter import (AdapterAttention, AdapterConfig, AdapterGPT, adapter_state_dict, mark_only_adapter_trainable,
                                 num_trainable_params)
from lit_adapter.checkpoint import (ADAPTER_FORMAT, CONFIG_FILE, WEIGHTS_FILE, adapter_config, adapter_prompt_style,
                                    load_adapter, load_model, read_config, save_adapter, save_checkpoint_dir, save_config)
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.model import GPT
from tests.test_model import cached_logits, random_model, reference_logits

# 3 layers, adapters in layers 1 and 2, 4 query heads over 2 kv heads
TINY = AdapterConfig.from_name("tiny", adapter_prompt_length=4, adapter_start_layer=1)


def adapter_names(config):
    return {f"blocks.{i}.attn.adapter_{kind}" for i in range(config.adapter_start_layer, config.n_layer)
            for kind in ("prompt", "gate")}


def adapter_with_base_of(base: GPT, config: Config = None) -> AdapterGPT:
    """An AdapterGPT holding exactly ``base``'s weights (and fresh prompts, zero gates)."""
    model = AdapterGPT(config or base.config)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert set(result.missing_keys) == adapter_names(model.config) and not result.unexpected_keys
    return model.eval()


def one_line_user_error(excinfo, *words):
    message = str(excinfo.value)
    assert excinfo.type is UserError
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# ---------------------------------------------------------------- the forward pass


@pytest.mark.parametrize("config", [TINY, AdapterConfig.from_name("tiny", n_kv_head=4), AdapterConfig.from_name("tiny", tie_embeddings=True)],
                         ids=["gqa", "mha", "tied"])
def test_zero_gates_equal_the_base_model_exactly(config):
    base = random_model(GPT, config)
    model = adapter_with_base_of(base)
    assert all(torch.count_nonzero(b.attn.adapter_gate) == 0 for b in model.blocks[config.adapter_start_layer:])
    assert all(b.attn.adapter_prompt.abs().sum() > 0 for b in model.blocks[config.adapter_start_layer:])
    idx = torch.randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))
        assert torch.equal(cached_logits(model, idx, 4, 16), cached_logits(base, idx, 4, 16))


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 4}, {"n_kv_head": 1}, {"tie_embeddings": True},
                                       {"adapter_start_layer": 0, "adapter_prompt_length": 7}],
                         ids=["gqa", "mha", "mqa", "tied", "all-layers"])
def test_adapter_matches_the_papers_equation(overrides):
    config = AdapterConfig.from_name("tiny", **overrides)
    model = random_model(AdapterGPT, config, gate_scale=1.0)
    idx = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(idx)
        base_logits = random_model(GPT, config)(idx)  # same seed: same base weights, no adapter
    expected = reference_logits(model, idx)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    # the adapter changes the output materially, so the comparison above tests its term
    assert (logits - base_logits).abs().max() > 0.1


def test_adapter_prompts_attend_through_frozen_kv_projection_per_head():
    """One adapted layer, checked per head: gate h scales head h's prompt attention only."""
    config = AdapterConfig.from_name("tiny", n_layer=1, adapter_start_layer=0)
    model = random_model(AdapterGPT, config)
    attn = model.blocks[0].attn
    idx = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        reference = model(idx)
        attn.adapter_gate[3] = 0.0
        changed = model(idx)
        attn.adapter_gate.zero_()
        attn.adapter_gate[3] = 2.5
        only_head_3 = model(idx)
    torch.testing.assert_close(reference_logits(model, idx), only_head_3.double(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference, changed)


# ---------------------------------------------------------------- what trains


def test_only_prompts_and_gates_are_trainable():
    model = AdapterGPT(TINY)
    mark_only_adapter_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(TINY)
    assert set(adapter_state_dict(model)) == trainable
    assert num_trainable_params(model) == 2 * (4 * 32 + 4)
    assert model.blocks[1].attn.adapter_prompt.shape == (4, 32) and model.blocks[1].attn.adapter_gate.shape == (4,)
    assert not isinstance(model.blocks[0].attn, AdapterAttention)


def test_llama_7b_has_1_229_760_trainable_parameters():
    with torch.device("meta"):
        model = AdapterGPT(Config.from_name("llama-7b"))
    mark_only_adapter_trainable(model)
    assert num_trainable_params(model) == 1_229_760 == 30 * 10 * 4096 + 30 * 32


def test_llama_2_70b_trainable_parameters():
    with torch.device("meta"):
        model = AdapterGPT(Config.from_name("llama-2-70b"))
    mark_only_adapter_trainable(model)
    # the paper's share of adapted layers (30 of 32) scaled to 80 layers: the top 75
    assert model.config.adapter_start_layer == 5
    assert num_trainable_params(model) == 75 * (10 * 8192 + 64)


# ---------------------------------------------------------------- gradients while alternating train / generate


def expected_prompt_kv(attn):
    """Prompt keys and gated values computed directly from the current parameters, per query head."""
    c = attn.config
    w = attn.qkv.weight.detach()
    q_size, kv_size = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    P = attn.adapter_prompt.detach()
    k = (P @ w[q_size : q_size + kv_size].T).view(-1, c.n_kv_head, c.head_dim)
    v = (P @ w[q_size + kv_size :].T).view(-1, c.n_kv_head, c.head_dim)
    heads = [h // (c.n_head // c.n_kv_head) for h in range(c.n_head)]
    k = torch.stack([k[:, g] for g in heads])  # (H, L, D)
    v = torch.stack([attn.adapter_gate.detach()[h] * v[:, g] for h, g in enumerate(heads)])
    return k[None], v[None]


def test_prompts_and_gates_learn_across_train_eval_generate_cycles():
    torch.manual_seed(0)
    config = TINY
    base = random_model(GPT, config)
    model = adapter_with_base_of(base)
    mark_only_adapter_trainable(model)
    adapted = [b.attn for b in model.blocks[config.adapter_start_layer:]]
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    previous_cache = None
    for step in range(5):
        model.train()
        idx = torch.randint(0, config.vocab_size, (4, 12))
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for attn in adapted:
            assert attn.adapter_gate.grad is not None and attn.adapter_prompt.grad is not None
            assert torch.count_nonzero(attn.adapter_gate.grad) == config.n_head, (step, attn.adapter_gate.grad)
            if step == 0:  # zero gates: the prompts cannot influence the loss yet
                assert torch.count_nonzero(attn.adapter_prompt.grad) == 0
            else:
                assert attn.adapter_prompt.grad.abs().sum() > 0, f"step {step}: prompt gets no gradient"
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()

        # evaluation and generation in between, as a training loop with sample generation does
        model.eval()
        with torch.no_grad():
            model(idx)
            model.set_kv_cache(batch_size=1, max_seq_length=16)
            assert not any(attn.prompt_cache_filled for attn in adapted)  # filled by the first cached forward
            out = model(idx[:1, :4], input_pos=torch.arange(4))
            for attn in adapted:  # the cache holds the prompts as they are after this update
                assert attn.prompt_cache_filled
                k, v = attn.prompt_cache.k, attn.prompt_cache.v
                exp_k, exp_v = expected_prompt_kv(attn)
                torch.testing.assert_close(k, exp_k)
                torch.testing.assert_close(v, exp_v)
            cache = [attn.prompt_cache.k.clone() for attn in adapted]
            if previous_cache is not None:
                assert all(not torch.equal(a, b) for a, b in zip(cache, previous_cache)), "stale prompt cache"
            previous_cache = cache
            for t in range(4, 8):
                out = model(out[:, -1:].argmax(-1), input_pos=torch.tensor([t]))
            model.clear_kv_cache()
        assert all(attn.prompt_cache is None and not attn.prompt_cache_filled and attn.kv_cache is None for attn in adapted)
        assert model.cache_positions is None
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(attn.adapter_gate.abs().min() > 0 for attn in adapted)


def test_training_forward_does_not_use_a_prompt_cache():
    """With no cache set, the forward recomputes the prompt keys/values, so gradients reach the prompts."""
    model = random_model(AdapterGPT, TINY)
    mark_only_adapter_trainable(model)
    with torch.no_grad():
        model.set_kv_cache(batch_size=1, max_seq_length=8)
    model.clear_kv_cache()
    model.train()
    model(torch.randint(0, 512, (2, 6))).sum().backward()
    assert all(b.attn.adapter_prompt.grad.abs().sum() > 0 for b in model.blocks[1:])


def test_activation_checkpointing_gives_the_same_adapter_gradients():
    model = random_model(AdapterGPT, TINY)
    mark_only_adapter_trainable(model)
    model.train()
    idx = torch.randint(0, 512, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        model(idx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == adapter_names(TINY)
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0
        torch.testing.assert_close(grads[1][name], grads[0][name])


# ---------------------------------------------------------------- adapter files


def trained_adapter(config=TINY, seed=1):
    """An AdapterGPT whose prompts and gates are random (as after training)."""
    return random_model(AdapterGPT, config, seed=seed)


def test_adapter_file_round_trip_is_exact(tmp_path):
    model = trained_adapter()
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, model, TINY, prompt_style="chat")
    assert set(load_file(path)) == adapter_names(TINY)
    assert adapter_prompt_style(path) == "chat"

    assert adapter_config(path, AdapterConfig.from_name("tiny", adapter_prompt_length=10, adapter_start_layer=0)) == TINY
    other = random_model(AdapterGPT, TINY, seed=2)
    load_adapter(other, path)
    for name, tensor in adapter_state_dict(model).items():
        assert torch.equal(other.state_dict()[name], tensor), name
    # base weights untouched by loading an adapter
    assert torch.equal(other.embed.weight, random_model(AdapterGPT, TINY, seed=2).embed.weight)


def test_adapter_file_records_adapter_shape(tmp_path):
    """A file trained with another prompt length / start layer yields that config, and loads into it."""
    config = AdapterConfig.from_name("tiny", adapter_prompt_length=6, adapter_start_layer=2)
    path = tmp_path / "adapter.safetensors"
    model = trained_adapter(config)
    save_adapter(path, model, config)
    recovered = adapter_config(path, TINY)
    assert recovered.adapter_prompt_length == 6 and recovered.adapter_start_layer == 2
    target = AdapterGPT(recovered)
    load_adapter(target, path)
    assert torch.equal(target.blocks[2].attn.adapter_prompt, model.blocks[2].attn.adapter_prompt)


@pytest.mark.parametrize("base,words", [
    (Config.from_name("tiny", n_embd=64), ["trained for base tiny", "n_embd 32 vs 64"]),
    (Config.from_name("tiny", n_layer=4), ["n_layer 3 vs 4"]),
    (Config.from_name("stories260K"), ["trained for base tiny", "stories260K"]),
    (Config.from_name("llama-7b"), ["llama-7b", "vocab_size 512 vs 32000"]),
])
def test_adapter_for_another_base_is_refused(tmp_path, base, words):
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, trained_adapter(), TINY)
    with pytest.raises(UserError) as excinfo:
        adapter_config(path, base)
    one_line_user_error(excinfo, str(path), *words)


def test_adapter_for_another_preset_of_the_same_shape_is_refused(tmp_path):
    """A LLaMA-1 7B adapter must not load silently onto Llama 2 7B weights (same shapes, different model)."""
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, None, Config.from_name("llama-7b"), state_dict={"blocks.2.attn.adapter_gate": torch.zeros(32)})
    with pytest.raises(UserError) as excinfo:
        adapter_config(path, Config.from_name("llama-2-7b"))
    one_line_user_error(excinfo, str(path), "llama-7b", "llama-2-7b")


@pytest.mark.parametrize("overrides,words", [
    ({"adapter_prompt_length": 6}, ["adapter_prompt", "has shape (4, 32)", "expects (6, 32)"]),
    ({"adapter_start_layer": 0}, ["missing keys [blocks.0.attn.adapter_gate, blocks.0.attn.adapter_prompt]"]),
    ({"adapter_start_layer": 2}, ["unexpected keys [blocks.1.attn.adapter_gate, blocks.1.attn.adapter_prompt]"]),
    ({"n_layer": 4}, ["missing keys [blocks.3.attn.adapter_gate"]),
    ({"n_embd": 64}, ["has shape (4, 32)", "expects (4, 64)"]),
])
def test_adapter_file_of_another_shape_does_not_load(tmp_path, overrides, words):
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, trained_adapter(), TINY)
    model = AdapterGPT(AdapterConfig.from_name("tiny", **{"adapter_prompt_length": 4, "adapter_start_layer": 1,
                                                          **overrides}))
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    with pytest.raises(UserError) as excinfo:
        load_adapter(model, path)
    one_line_user_error(excinfo, str(path), *words)
    assert all(torch.equal(v, before[k]) for k, v in adapter_state_dict(model).items())


def write_bad_file(path, kind, good):
    if kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "small header length":
        path.write_bytes((20).to_bytes(8, "little") + b"this is not json !!!" + b"\0" * 64)
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) - 100])
    elif kind == "header only":
        path.write_bytes(good.read_bytes()[:6])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "torch pickle":
        torch.save({"model": {"x": torch.zeros(2)}}, path)


@pytest.mark.parametrize("kind", ["random bytes", "small header length", "truncated", "header only", "empty", "torch pickle"])
def test_corrupt_adapter_files_are_refused(tmp_path, kind):
    good = tmp_path / "good.safetensors"
    save_adapter(good, trained_adapter(), TINY)
    path = tmp_path / "bad.safetensors"
    write_bad_file(path, kind, good)
    for call in (lambda: adapter_config(path, TINY), lambda: load_adapter(AdapterGPT(TINY), path)):
        with pytest.raises(UserError) as excinfo:
            call()
        one_line_user_error(excinfo, str(path), "not a readable safetensors file")


def test_missing_adapter_file_is_refused(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    for call in (lambda: adapter_config(path, TINY), lambda: load_adapter(AdapterGPT(TINY), path)):
        with pytest.raises(UserError) as excinfo:
            call()
        one_line_user_error(excinfo, str(path), "not found")


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in adapter_state_dict(trained_adapter()).items()}, path)
    with pytest.raises(UserError) as excinfo:
        adapter_config(path, TINY)
    one_line_user_error(excinfo, str(path), "not a lit_adapter adapter file", ADAPTER_FORMAT)
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "pt"})
    with pytest.raises(UserError) as excinfo:
        adapter_config(path, TINY)
    one_line_user_error(excinfo, "not a lit_adapter adapter file")


@pytest.mark.parametrize("edit,words", [
    ("drop", ["missing keys [blocks.2.attn.adapter_gate]", "unexpected keys []"]),
    ("extra", ["unexpected keys [blocks.0.attn.qkv.weight]"]),
    ("reshape", ["blocks.1.attn.adapter_gate has shape (5,)", "expects (4,)"]),
])
def test_adapter_file_with_wrong_keys_or_shapes_is_refused(tmp_path, edit, words):
    model = trained_adapter()
    state = dict(adapter_state_dict(model))
    if edit == "drop":
        del state["blocks.2.attn.adapter_gate"]
    elif edit == "extra":
        state["blocks.0.attn.qkv.weight"] = model.blocks[0].attn.qkv.weight
    else:
        state["blocks.1.attn.adapter_gate"] = torch.zeros(5)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, model, TINY, state_dict=state)
    # metadata fine, the tensors are what is wrong: refused from the header before a model is built, and on loading
    for check in (lambda: adapter_config(path, TINY), lambda: load_adapter(AdapterGPT(TINY), path)):
        with pytest.raises(UserError) as excinfo:
            check()
        one_line_user_error(excinfo, str(path), *words)


# ---------------------------------------------------------------- checkpoint directories


@pytest.fixture
def checkpoint_dir(tmp_path):
    base = random_model(GPT, TINY)
    directory = tmp_path / "checkpoint"
    save_checkpoint_dir(base.state_dict(), TINY, None, directory)
    return directory, base


def test_checkpoint_dir_round_trip(checkpoint_dir):
    directory, base = checkpoint_dir
    assert {p.name for p in directory.iterdir()} == {WEIGHTS_FILE, CONFIG_FILE}
    idx = torch.randint(0, 512, (2, 7))
    model = load_model(directory)
    assert type(model) is GPT and model.config == TINY.base()  # the folder holds the base shape only
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), base(idx))
        adapter = load_model(directory, adapter=True).eval()
        assert isinstance(adapter, AdapterGPT)
        assert torch.equal(adapter(idx), base(idx))  # fresh adapter: zero gates


def test_checkpoint_dir_in_bfloat16_keeps_adapter_float32_and_loads_an_adapter(checkpoint_dir, tmp_path):
    directory, base = checkpoint_dir
    trained = trained_adapter()
    adapter_path = tmp_path / "adapter.safetensors"
    save_adapter(adapter_path, trained, TINY)
    model = load_model(directory, adapter=True, config=adapter_config(adapter_path, read_config(directory)),
                       dtype=torch.bfloat16)
    load_adapter(model, adapter_path)
    assert model.embed.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in adapter_state_dict(model).values())
    assert all(torch.equal(v, adapter_state_dict(trained)[k]) for k, v in adapter_state_dict(model).items())
    assert torch.equal(model.embed.weight, base.embed.weight.bfloat16())
    with torch.no_grad():
        assert model(torch.randint(0, 512, (1, 5))).dtype == torch.bfloat16


def test_checkpoint_dir_without_config_is_refused(checkpoint_dir):
    directory, _ = checkpoint_dir
    (directory / CONFIG_FILE).unlink()
    with pytest.raises(UserError) as excinfo:
        load_model(directory)
    one_line_user_error(excinfo, CONFIG_FILE, "not found")
    with pytest.raises(UserError) as excinfo:
        load_model(directory.parent / "missing")
    one_line_user_error(excinfo, "missing", "not found")


def test_checkpoint_dir_with_mismatched_shapes_is_refused(checkpoint_dir):
    directory, _ = checkpoint_dir
    save_config(Config.from_name("tiny", n_embd=64), directory)
    with pytest.raises(UserError) as excinfo:
        load_model(directory)
    one_line_user_error(excinfo, WEIGHTS_FILE, "has shape", "expects")
    save_config(Config.from_name("tiny", n_layer=4), directory)
    with pytest.raises(UserError) as excinfo:
        load_model(directory, adapter=True)
    one_line_user_error(excinfo, "missing keys [blocks.3.")


@pytest.mark.parametrize("kind", ["truncated", "header only", "random bytes"])
def test_checkpoint_dir_with_corrupt_weights_is_refused(checkpoint_dir, kind):
    directory, _ = checkpoint_dir
    weights = directory / WEIGHTS_FILE
    good = directory.parent / "good.safetensors"
    good.write_bytes(weights.read_bytes())
    write_bad_file(weights, kind, good)
    with pytest.raises(UserError) as excinfo:
        load_model(directory)
    one_line_user_error(excinfo, str(weights), "not a readable safetensors file")


def test_checkpoint_dir_with_invalid_config_values_is_refused(checkpoint_dir):
    directory, _ = checkpoint_dir
    (directory / CONFIG_FILE).write_text(json.dumps({"n_embd": 30, "n_head": 4}))
    with pytest.raises(UserError) as excinfo:
        load_model(directory)
    one_line_user_error(excinfo, "divisible")


def test_saving_a_checkpoint_dir_checks_the_weights(tmp_path):
    state = random_model(GPT, TINY).state_dict()
    del state["norm.weight"]
    with pytest.raises(UserError) as excinfo:
        save_checkpoint_dir(state, TINY, None, tmp_path / "out")
    one_line_user_error(excinfo, "missing keys [norm.weight]")
    assert not (tmp_path / "out" / WEIGHTS_FILE).exists()


def test_the_default_adapter_shape_is_the_papers_share_or_the_top_half_of_a_small_model():
    names = ("llama-7b", "llama-3.2-1b", "smollm2-135m", "stories260K")
    shape = {name: AdapterConfig.from_name(name) for name in names}
    assert {name: (c.n_adapter_layers, c.adapter_prompt_length) for name, c in shape.items()} == {
        "llama-7b": (30, 10), "llama-3.2-1b": (15, 10), "smollm2-135m": (15, 10), "stories260K": (2, 10)}
