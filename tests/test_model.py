"""The base LLaMA: rotary embeddings, KV-cached decoding, output head, config presets and files."""

import math
import struct
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from lit_adapter.adapter import AdapterConfig, AdapterGPT
from lit_adapter.checkpoint import CONFIG_FILE, read_config, save_config
from lit_adapter.config import PRESETS, Config
from lit_adapter.errors import UserError
from lit_adapter.model import GPT, apply_rope, build_rope_cache, init_weights

# grouped-query attention (2 query heads per kv head) and plain multi-head attention
GQA = AdapterConfig.from_name("tiny")
MHA = AdapterConfig.from_name("tiny", n_kv_head=4)


def random_model(model_class, config, seed=0, gate_scale=1.0):
    """A model with random weights, norm weights away from 1 and (for the adapter) non-zero gates."""
    torch.manual_seed(seed)
    model = model_class(config)
    init_weights(model, std=0.2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("adapter_gate"):
                param.normal_(0.0, gate_scale)
    return model.eval()


def reference_logits(model, idx):
    """LLaMA (+ LLaMA-Adapter where the state dict has prompts) in float64, straight from the equations.

    Written independently of lit_adapter.model: per head loops, RoPE as complex multiplication, separate
    softmaxes for the tokens and the adaption prompts, prompt keys/values without RoPE or norm.
    """
    config = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    H, G, D, I = config.n_head, config.n_kv_head, config.head_dim, config.intermediate_size
    B, T = idx.shape

    def rms_norm(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * weight

    freqs = 1.0 / config.rope_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    rotation = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), freqs))

    def rope(t):  # (B, T, heads, D)
        pairs = torch.view_as_complex(t.reshape(*t.shape[:-1], D // 2, 2).contiguous())
        return torch.view_as_real(pairs * rotation[None, :, None, :]).flatten(-2)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["embed.weight"][idx]
    for layer in range(config.n_layer):
        p = f"blocks.{layer}."
        h = rms_norm(x, sd[p + "attn_norm.weight"])
        w = sd[p + "attn.qkv.weight"]
        wq, wk, wv = w[: H * D], w[H * D : H * D + G * D], w[H * D + G * D :]
        q = rope((h @ wq.T).view(B, T, H, D))
        k = rope((h @ wk.T).view(B, T, G, D))
        v = (h @ wv.T).view(B, T, G, D)
        adapted = p + "attn.adapter_prompt" in sd
        if adapted:
            prompt, gate = sd[p + "attn.adapter_prompt"], sd[p + "attn.adapter_gate"]
            prompt_k = (prompt @ wk.T).view(-1, G, D)
            prompt_v = (prompt @ wv.T).view(-1, G, D)
        heads = []
        for head in range(H):
            g = head // (H // G)
            scores = q[:, :, head] @ k[:, :, g].transpose(1, 2) / math.sqrt(D)
            out = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v[:, :, g]
            if adapted:
                prompt_scores = q[:, :, head] @ prompt_k[:, g].T / math.sqrt(D)
                out = out + gate[head] * torch.softmax(prompt_scores, dim=-1) @ prompt_v[:, g]
            heads.append(out)
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attn.proj.weight"].T
        h = rms_norm(x, sd[p + "mlp_norm.weight"])
        w = sd[p + "mlp.gate_up.weight"]
        x = x + (F.silu(h @ w[:I].T) * (h @ w[I:].T)) @ sd[p + "mlp.down.weight"].T
    x = rms_norm(x, sd["norm.weight"])
    head_weight = sd["embed.weight"] if config.tie_embeddings else sd["lm_head.weight"]
    return x @ head_weight.T


# ---------------------------------------------------------------- RoPE


def complex_rope(x, seq_len, base):
    """Meta's LLaMA rotary embedding: interleaved pairs as complex numbers times exp(i * pos * theta_j)."""
    D = x.size(-1)
    freqs = 1.0 / base ** (torch.arange(0, D, 2)[: D // 2].float() / D)
    freqs_cis = torch.polar(torch.ones(seq_len, D // 2), torch.outer(torch.arange(seq_len).float(), freqs))
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_ * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


@pytest.mark.parametrize("T,heads,D,base", [(1, 1, 2, 10000.0), (7, 4, 8, 10000.0), (33, 3, 16, 500000.0), (64, 2, 128, 10000.0)])
def test_apply_rope_matches_complex_implementation(T, heads, D, base):
    torch.manual_seed(T)
    x = torch.randn(2, T, heads, D)
    rope = build_rope_cache(T, D, base)
    assert rope.shape == (T, D // 2, 2)
    torch.testing.assert_close(apply_rope(x, rope), complex_rope(x, T, base))


def test_rope_position_zero_is_identity_and_rotation_keeps_norms():
    x = torch.randn(1, 16, 2, 8)
    out = apply_rope(x, build_rope_cache(16, 8, 10000.0))
    assert torch.equal(out[:, 0], x[:, 0])
    torch.testing.assert_close(out.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))
    # the relative property: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = torch.randn(8), torch.randn(8)
    rope = build_rope_cache(16, 8, 10000.0)
    rot = lambda v, pos: apply_rope(v.view(1, 1, 1, 8), rope[pos : pos + 1]).flatten()
    torch.testing.assert_close(rot(q, 5) @ rot(k, 2), rot(q, 13) @ rot(k, 10), rtol=1e-5, atol=1e-5)


def test_apply_rope_keeps_dtype():
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    out = apply_rope(x, build_rope_cache(4, 8, 10000.0))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, complex_rope(x, 4, 10000.0))


# ---------------------------------------------------------------- forward vs the reference equations


@pytest.mark.parametrize("config", [GQA, MHA, Config.from_name("tiny", tie_embeddings=True)], ids=["gqa", "mha", "tied"])
def test_gpt_matches_reference_equations(config):
    model = random_model(GPT, config)
    idx = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        logits = model(idx)
    expected = reference_logits(model, idx)
    assert logits.shape == (2, 11, config.vocab_size)
    assert expected.std() > 0.5  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- KV cache


def cached_logits(model, idx, prefill, max_seq_length):
    """Prefill ``prefill`` tokens at once, then feed the rest one token at a time through the KV cache."""
    T = idx.size(1)
    model.set_kv_cache(batch_size=idx.size(0), max_seq_length=max_seq_length)
    try:
        outs = [model(idx[:, :prefill], input_pos=torch.arange(prefill))]
        for t in range(prefill, T):
            outs.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t])))
    finally:
        model.clear_kv_cache()
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("model_class", [GPT, AdapterGPT])
@pytest.mark.parametrize("config", [GQA, MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("prefill", [1, 5])
def test_kv_cached_decoding_equals_uncached_forward(model_class, config, prefill):
    model = random_model(model_class, config)
    if model_class is AdapterGPT:
        assert all(b.attn.adapter_gate.abs().min() > 0 for b in model.blocks[config.adapter_start_layer :])
    idx = torch.randint(0, config.vocab_size, (3, 12))
    with torch.no_grad():
        full = model(idx)
        cached = cached_logits(model, idx, prefill, max_seq_length=20)
        # a cache as long as block_size gives the same
        cached_long = cached_logits(model, idx, prefill, max_seq_length=config.block_size)
    torch.testing.assert_close(cached, full)
    torch.testing.assert_close(cached_long, full)
    assert all(block.attn.kv_cache is None for block in model.blocks) and model.cache_positions is None


def test_kv_cache_is_reusable_after_reset():
    """A second generation with a fresh cache must not see the first one's keys."""
    model = random_model(GPT, GQA)
    a, b = torch.randint(0, 512, (1, 8)), torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        cached_logits(model, a, 3, 16)
        torch.testing.assert_close(cached_logits(model, b, 3, 16), model(b))


def test_input_pos_without_cache_raises():
    model = random_model(GPT, GQA)
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), input_pos=torch.arange(2))


# ---------------------------------------------------------------- output head, block size


def test_tied_and_untied_output_head():
    tied = random_model(GPT, Config.from_name("tiny", tie_embeddings=True))
    untied = random_model(GPT, Config.from_name("tiny", tie_embeddings=False))
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()
    assert untied.lm_head.weight.shape == (512, 32)
    n_tied, n_untied = (sum(p.numel() for p in m.parameters()) for m in (tied, untied))
    assert n_untied - n_tied == 512 * 32

    idx = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        hidden = final_hidden_states(tied, idx)
        assert hidden.shape == (2, 6, 32)
        torch.testing.assert_close(tied(idx), hidden @ tied.embed.weight.T)
        hidden = final_hidden_states(untied, idx)
        torch.testing.assert_close(untied(idx), hidden @ untied.lm_head.weight.T)
        assert not torch.allclose(untied(idx), hidden @ untied.embed.weight.T)

    # tied: the embedding row of token 7 is also its output row, so it gets gradient from the head
    tied.train()
    idx = torch.tensor([[3, 4, 5]])
    F.cross_entropy(tied(idx).flatten(0, 1), torch.tensor([7, 7, 7])).backward()
    assert tied.embed.weight.grad[7].abs().sum() > 0


def final_hidden_states(model, idx):
    """What the output head of ``model`` reads for ``idx``: the final norm's output."""
    seen = []
    handle = model.norm.register_forward_hook(lambda module, args, output: seen.append(output))
    model(idx)
    handle.remove()
    return seen[0]


def test_logits_at_gives_the_chosen_positions_logits():
    model = random_model(AdapterGPT, GQA)
    idx = torch.randint(0, 512, (3, 7))
    rows, columns = torch.tensor([0, 2, 2]), torch.tensor([6, 0, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(idx, logits_at=(rows, columns)), model(idx)[rows, columns])


def test_block_size_overflow_raises():
    config = Config.from_name("tiny", block_size=16)
    model = random_model(GPT, config)
    with torch.no_grad():
        assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 512)
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model.set_kv_cache(batch_size=1, max_seq_length=17)


def test_rope_cache_rebuilt_after_meta_init():
    config = Config.from_name("tiny")
    reference = random_model(GPT, config)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    model.reset_parameters()
    idx = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), reference(idx))


# ---------------------------------------------------------------- Config


def test_llama_presets_have_published_shapes():
    c = AdapterConfig.from_name("llama-7b")
    assert (c.n_layer, c.n_embd, c.intermediate_size, c.n_head, c.n_kv_head, c.vocab_size) == (32, 4096, 11008, 32, 32, 32000)
    assert c.n_adapter_layers == 30 and c.adapter_prompt_length == 10 and c.head_dim == 128
    c = Config.from_name("llama-65b")
    assert (c.n_layer, c.n_embd, c.intermediate_size, c.n_head) == (80, 8192, 22016, 64)
    c = Config.from_name("llama-2-70b")
    assert (c.n_layer, c.n_embd, c.intermediate_size, c.n_head, c.n_kv_head, c.block_size) == (80, 8192, 28672, 64, 8, 4096)
    assert Config.from_name("llama-13b").n_embd == 5120 and Config.from_name("llama-30b").n_layer == 60


def test_stories260k_preset_matches_checkpoint_header(stories260k_bin):
    with open(stories260k_bin, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", f.read(28))
    c = Config.from_name("stories260K")
    assert (dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) == (64, 172, 5, 8, 4, 512, 512)
    assert (c.n_embd, c.intermediate_size, c.n_layer, c.n_head, c.n_kv_head, c.vocab_size, c.block_size) == (
        dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len)
    assert c.tie_embeddings == (vocab > 0) and c.norm_eps == 1e-5


def test_config_overrides_and_validation():
    c = Config.from_name("tiny", n_layer=5)
    assert c.n_layer == 5 and c.name == "tiny"
    assert Config(n_head=8, n_embd=64).n_kv_head == 8
    with pytest.raises(UserError, match="unknown model preset 'llama-8b'"):
        Config.from_name("llama-8b")
    with pytest.raises(UserError, match="divisible by n_head"):
        Config(n_head=5, n_embd=64)
    with pytest.raises(UserError, match="divisible by n_kv_head"):
        Config(n_head=8, n_kv_head=3, n_embd=64)
    with pytest.raises(UserError, match="adapter_start_layer"):
        AdapterConfig.from_name("tiny", adapter_start_layer=4)


@pytest.mark.parametrize("field, value, message", [
    ("block_size", 10**12, "block_size must be a whole number from 1 to 4194304, got 1000000000000"),
    ("block_size", -1, "block_size must be a whole number from 1 to 4194304, got -1"),
    ("n_layer", 10**8, "n_layer must be a whole number from 1 to 1024, got 100000000"),
    ("n_head", 0, "n_head must be a whole number from 1 to 1024, got 0"),
    ("n_kv_head", -2, "n_kv_head must be a whole number from 1 to 1024, got -2"),
    ("n_embd", 32.0, "n_embd must be a whole number from 1 to 65536, got 32.0"),
    ("vocab_size", True, "vocab_size must be a whole number from 1 to 2097152, got True"),
    ("intermediate_size", "64", "intermediate_size must be a whole number from 1 to 262144, got '64'"),
    ("norm_eps", float("nan"), "norm_eps must be a number from 1e-12 to 0.1, got nan"),
    ("rope_base", [10000.0], "rope_base must be a number from 1 to 1e+12, got [10000.0]"),
    ("rope_scaling_factor", "linear", "rope_scaling_factor must be a number from 1 to 1024, got 'linear'"),
    ("rope_high_freq_factor", 1.0, "rope_low_freq_factor (1.0) must be below rope_high_freq_factor (1.0)"),
    ("rope_original_max_positions", 0, "rope_original_max_positions must be a whole number from 1 to 4194304"),
    ("tie_embeddings", "yes", "tie_embeddings must be true or false, got 'yes'"),
    ("name", 7, "name must be a string, got 7"),
])
def test_config_checks_every_field_before_any_use(field, value, message):
    with pytest.raises(UserError) as excinfo:
        Config(**{**asdict(Config.from_name("tiny")), field: value})
    assert str(excinfo.value).startswith(message)


def test_config_keeps_float_fields_float():
    config = Config.from_name("tiny", rope_base=500000, rope_scaling_factor=8)
    assert (type(config.rope_base), type(config.rope_scaling_factor)) == (float, float)
    assert all(Config.from_name(name) == preset for name, preset in PRESETS.items())


@pytest.mark.parametrize("name", ["tiny", "llama-2-70b", "stories15M", "llama-3.1-8b"])
def test_config_save_and_from_file_round_trip(tmp_path, name):
    config = Config.from_name(name)
    save_config(config, tmp_path)
    assert read_config(tmp_path) == config
    assert read_config(tmp_path / CONFIG_FILE) == config
    # the scaling's parameters are written only for a model that scales its RoPE
    written = (tmp_path / CONFIG_FILE).read_text()
    assert ("rope_low_freq_factor" in written) == (config.rope_scaling_factor is not None), written


def test_config_from_file_rejects_unknown_keys_and_missing_file(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("n_layer: 2\nn_embd: 32\nn_head: 4\nhidden_size: 12\n")
    with pytest.raises(UserError, match=r"unknown config keys \['hidden_size'\]"):
        read_config(tmp_path)
    with pytest.raises(UserError, match="not found"):
        read_config(tmp_path / "elsewhere")
