"""Checkpoint conversion: Hugging Face parity, an independent llama2.c forward pass, Meta shards, refusals, CLI."""

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script, run_script_in_this_process, script_env, shared_file
from safetensors.torch import load_file, save_file

from lit_adapter.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model, read_config, save_checkpoint_dir
from lit_adapter.config import Config, swiglu_hidden_size
from lit_adapter.convert import convert
from lit_adapter.convert.hf import convert_hf
from lit_adapter.convert.llama2c import convert_llama2c
from lit_adapter.convert.meta import convert_meta, meta_config
from lit_adapter.errors import UserError
from lit_adapter.model import GPT
from lit_adapter.tokenizer import TOKENIZER_FILE, Tokenizer


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every mapping mistake shows in the logits; norm gains around 1, not all 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            mean, std = (1.0, 0.2) if param.dim() == 1 else (0.0, 0.2)
            param.copy_(torch.randn(param.shape, generator=generator) * std + mean)


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---- Hugging Face


def save_hf_llama(directory: Path, tied: bool, layout: str = "safetensors"):
    """A random grouped-query LlamaForCausalLM saved to ``directory`` in one of HF's weight layouts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tied,
                            attn_implementation="eager")
    hf = LlamaForCausalLM(hf_config).float().eval()
    randomize_(hf)
    hf.save_pretrained(directory, max_shard_size="100KB" if layout == "sharded" else "50GB")
    if layout == "bin":
        (directory / "model.safetensors").unlink()
        torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    return hf


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_logits_match_transformers(tmp_path, tied, layout):
    hf = save_hf_llama(tmp_path / "hf", tied, layout)
    state_dict, config = convert_hf(tmp_path / "hf")
    assert (config.n_head, config.n_kv_head, config.n_embd, config.intermediate_size) == (4, 2, 64, 96)
    assert (config.block_size, config.norm_eps, config.rope_base, config.tie_embeddings) == (64, 1e-5, 500000.0, tied)
    assert ("lm_head.weight" in state_dict) != tied
    save_checkpoint_dir(state_dict, config, None, tmp_path / "ours")
    model = load_model(tmp_path / "ours").eval()

    idx = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        actual = model(idx)
    assert expected.abs().max() > 1  # a wrong rotary layout or weight mapping would show far above atol
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_hf_refuses_unknown_keys_missing_shards_and_scaled_rope(tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_llama(hf_dir, tied=False)
    weights = load_file(hf_dir / "model.safetensors")
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, hf_dir / "model.safetensors")
    with pytest.raises(UserError) as excinfo:
        convert_hf(hf_dir)
    one_line_error(excinfo, str(hf_dir), "unknown keys", "q_proj.bias")

    (hf_dir / "model.safetensors").unlink()
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as excinfo:
        convert_hf(hf_dir)
    one_line_error(excinfo, "model.safetensors.index.json", "model-00001-of-00002.safetensors")

    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as excinfo:
        convert_hf(hf_dir)
    one_line_error(excinfo, "config.json", "RoPE scaling 'yarn' is not supported (only 'llama3' or none)")
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as excinfo:
        convert_hf(hf_dir)
    one_line_error(excinfo, "config.json rope scaling lacks 'low_freq_factor'")

    with pytest.raises(UserError) as excinfo:
        convert_hf(tmp_path / "absent")
    one_line_error(excinfo, "config.json not found")


# ---- llama2.c: an independent NumPy forward pass in the manner of run.c


class Llama2cReference:
    """llama2.c's run.c in NumPy float32: one token at a time with a KV cache, RoPE from the file's own tables."""

    def __init__(self, path: Path) -> None:
        raw = path.read_bytes()
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
        self.floats, self.offset = np.frombuffer(raw, dtype="<f4", offset=28), 0
        self.n_heads, self.n_kv_heads, self.head_size = n_heads, n_kv_heads, dim // n_heads
        kv_dim, half = n_kv_heads * self.head_size, self.head_size // 2
        self.embedding = self.take(abs(vocab), dim)
        self.rms_att, self.wq = self.take(n_layers, dim), self.take(n_layers, dim, dim)
        self.wk, self.wv = self.take(n_layers, kv_dim, dim), self.take(n_layers, kv_dim, dim)
        self.wo, self.rms_ffn = self.take(n_layers, dim, dim), self.take(n_layers, dim)
        self.w1, self.w2 = self.take(n_layers, hidden, dim), self.take(n_layers, dim, hidden)
        self.w3 = self.take(n_layers, hidden, dim)
        self.rms_final = self.take(dim)
        self.cos, self.sin = self.take(seq_len, half), self.take(seq_len, half)
        self.classifier = self.embedding if vocab > 0 else self.take(-vocab, dim)
        self.keys = np.zeros((n_layers, seq_len, kv_dim), np.float32)
        self.values = np.zeros((n_layers, seq_len, kv_dim), np.float32)

    def take(self, *shape: int) -> np.ndarray:
        n = int(np.prod(shape))
        array = self.floats[self.offset:self.offset + n].reshape(shape)
        self.offset += n
        return array

    @staticmethod
    def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return weight * (x / np.sqrt(np.mean(x * x) + np.float32(1e-5)))

    def rotate(self, x: np.ndarray, pos: int) -> np.ndarray:
        pairs = x.reshape(-1, self.head_size // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        cos, sin = self.cos[pos], self.sin[pos]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)

    def forward(self, token: int, pos: int) -> np.ndarray:
        x = self.embedding[token].copy()
        group = self.n_heads // self.n_kv_heads
        for layer in range(len(self.wq)):
            xb = self.rmsnorm(x, self.rms_att[layer])
            q = self.rotate(self.wq[layer] @ xb, pos).reshape(self.n_heads, self.head_size)
            self.keys[layer, pos] = self.rotate(self.wk[layer] @ xb, pos)
            self.values[layer, pos] = self.wv[layer] @ xb
            keys = self.keys[layer, :pos + 1].reshape(pos + 1, self.n_kv_heads, self.head_size)
            values = self.values[layer, :pos + 1].reshape(pos + 1, self.n_kv_heads, self.head_size)
            out = np.empty_like(q)
            for h in range(self.n_heads):
                scores = keys[:, h // group] @ q[h] / np.sqrt(np.float32(self.head_size))
                weights = np.exp(scores - scores.max())
                out[h] = (weights / weights.sum()) @ values[:, h // group]
            x = x + self.wo[layer] @ out.reshape(-1)
            xb = self.rmsnorm(x, self.rms_ffn[layer])
            gate = self.w1[layer] @ xb
            x = x + self.w2[layer] @ (gate / (1 + np.exp(-gate)) * (self.w3[layer] @ xb))
        return self.classifier @ self.rmsnorm(x, self.rms_final)

    def greedy(self, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
        """The greedy continuation of ``prompt`` and the logits at each prompt position."""
        prompt_logits = np.stack([self.forward(token, pos) for pos, token in enumerate(prompt)])
        tokens, logits = [], prompt_logits[-1]
        for pos in range(len(prompt), len(prompt) + steps):
            tokens.append(int(logits.argmax()))
            logits = self.forward(tokens[-1], pos)
        return tokens, prompt_logits


def test_stories260k_matches_independent_llama2c_forward(tmp_path, stories260k_bin, tok512):
    state_dict, config = convert_llama2c(stories260k_bin)
    assert config.name == "stories260K"
    save_checkpoint_dir(state_dict, config, tok512, tmp_path)
    model = load_model(tmp_path).eval()
    tokenizer = Tokenizer(tmp_path)
    prompt = tokenizer.encode("Once upon a time")

    expected_tokens, expected_logits = Llama2cReference(stories260k_bin).greedy(prompt.tolist(), steps=50)
    idx = prompt[None]
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], torch.from_numpy(expected_logits), atol=1e-4, rtol=0)
        for _ in range(50):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert idx[0, len(prompt):].tolist() == expected_tokens
    assert tokenizer.decode(idx[0]).startswith("Once upon a time")


def test_llama2c_pt_and_bin_give_the_same_model():
    from_pt, pt_config = convert_llama2c(shared_file("tinystories_llama2c_500iter/ckpt.pt"))
    from_bin, bin_config = convert_llama2c(shared_file("tinystories_llama2c_500iter/model.bin"))
    assert pt_config == bin_config
    assert (pt_config.name, pt_config.intermediate_size, pt_config.block_size) == ("custom", 192, 256)
    assert pt_config.tie_embeddings and "lm_head.weight" not in from_pt
    assert_same_weights(from_pt, from_bin)


def test_llama2c_dtype_option(stories260k_bin):
    state_dict, _ = convert_llama2c(stories260k_bin, 512, dtype=torch.bfloat16)
    assert {tensor.dtype for tensor in state_dict.values()} == {torch.bfloat16}
    assert {tensor.dtype for tensor in convert_llama2c(stories260k_bin)[0].values()} == {torch.float32}


def test_llama2c_bin_format_errors(tmp_path, stories260k_bin):
    data = stories260k_bin.read_bytes()
    cases = {
        "truncated.bin": (data[:-100], "needs 1056540 bytes but the file has 1056440"),
        "short.bin": (data[:10], "too short"),
        "zero.bin": (struct.pack("<7i", 64, 172, 0, 8, 4, 512, 512) + data[28:], "bad llama2.c header"),
        "heads.bin": (struct.pack("<7i", 64, 172, 5, 8, 3, 512, 512) + data[28:], "divisible by n_kv_head"),
        "v1.bin": (struct.pack("<2i", 0x616B3432, 1) + data[8:], "versioned"),
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError) as excinfo:
            convert_llama2c(tmp_path / name)
        one_line_error(excinfo, str(tmp_path / name), fragment)


# ---- Meta


def lit_to_meta(state_dict: dict, config: Config) -> dict:
    """Meta's names and fused weights split apart: the inverse of the conversion, written out independently."""
    q, kv = config.n_embd, config.n_kv_head * config.head_dim
    meta = {"tok_embeddings.weight": state_dict["embed.weight"], "norm.weight": state_dict["norm.weight"],
            "output.weight": state_dict["lm_head.weight"]}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"layers.{i}."
        wq, wk, wv = state_dict[ours + "attn.qkv.weight"].split([q, kv, kv])
        w1, w3 = state_dict[ours + "mlp.gate_up.weight"].chunk(2)
        meta.update({
            theirs + "attention_norm.weight": state_dict[ours + "attn_norm.weight"],
            theirs + "attention.wq.weight": wq, theirs + "attention.wk.weight": wk, theirs + "attention.wv.weight": wv,
            theirs + "attention.wo.weight": state_dict[ours + "attn.proj.weight"],
            theirs + "ffn_norm.weight": state_dict[ours + "mlp_norm.weight"],
            theirs + "feed_forward.w1.weight": w1, theirs + "feed_forward.w3.weight": w3,
            theirs + "feed_forward.w2.weight": state_dict[ours + "mlp.down.weight"],
        })
    return meta


def write_meta_shards(directory: Path, weights: dict, n_shards: int, head_dim: int) -> None:
    """``weights`` as Meta's model-parallel ``consolidated.NN.pth`` files (column/row-parallel splits)."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = [{"rope.freqs": torch.rand(head_dim // 2)} for _ in range(n_shards)]
    for key, weight in weights.items():
        kind = key.split(".")[-2]
        column_parallel = kind in ("wq", "wk", "wv", "w1", "w3", "output")
        row_parallel = kind in ("wo", "w2", "tok_embeddings")
        dim = 0 if column_parallel else 1 if row_parallel else None
        parts = [weight] * n_shards if dim is None else weight.chunk(n_shards, dim)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    for n, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{n:02d}.pth")


TINY_META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
                    "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5}


def test_meta_shards_merge_to_the_original_model(tmp_path, tok512):
    config = Config("custom", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=256,
                    norm_eps=1e-5)
    original = GPT(config).eval()
    randomize_(original)
    meta_dir = tmp_path / "meta"
    write_meta_shards(meta_dir, lit_to_meta(original.state_dict(), config), n_shards=2, head_dim=config.head_dim)
    (meta_dir / "params.json").write_text(json.dumps(TINY_META_PARAMS))

    state_dict, converted_config, tokenizer_path = convert("meta", meta_dir, tok512)
    assert converted_config == config
    assert_same_weights(state_dict, original.state_dict())
    save_checkpoint_dir(state_dict, converted_config, tokenizer_path, tmp_path / "ours")
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ours")(idx), original(idx), atol=0, rtol=0)


def test_meta_format_errors(tmp_path):
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    with pytest.raises(UserError) as excinfo:
        convert_meta(meta_dir, vocab_size=512)
    one_line_error(excinfo, str(meta_dir / "params.json"), "not found")

    (meta_dir / "params.json").write_text(json.dumps(TINY_META_PARAMS))
    with pytest.raises(UserError) as excinfo:
        convert_meta(meta_dir)
    one_line_error(excinfo, "params.json", "vocab_size")
    with pytest.raises(UserError) as excinfo:
        convert_meta(meta_dir, vocab_size=512)
    one_line_error(excinfo, str(meta_dir), "no consolidated.*.pth")

    torch.save({"tok_embeddings.weight": torch.zeros(512, 64), "norm.weight": torch.ones(64)},
               meta_dir / "consolidated.00.pth")
    with pytest.raises(UserError) as excinfo:
        convert_meta(meta_dir, vocab_size=512)
    one_line_error(excinfo, str(meta_dir), "missing keys", "layers.0.attention.wk.weight", "(19 in all)")

    config = meta_config(TINY_META_PARAMS, 512, "params.json")
    weights = lit_to_meta(GPT(config).state_dict(), config)
    write_meta_shards(meta_dir, {**weights, "norm.weight": torch.ones(63)}, n_shards=1, head_dim=config.head_dim)
    with pytest.raises(UserError) as excinfo:
        convert_meta(meta_dir, vocab_size=512)
    one_line_error(excinfo, str(meta_dir), "norm.weight has shape (63,)", "needs (64,)")


@pytest.mark.parametrize("change, message", [
    ({"dim": "64"}, "params.json: dim must be a whole number from 1 to 65536, got '64'"),
    ({"n_layers": 10**8}, "params.json: n_layer must be a whole number from 1 to 1024, got 100000000"),
    ({"ffn_dim_multiplier": [1.5]}, "params.json: ffn_dim_multiplier must be a number from 0.01 to 100, got [1.5]"),
    ({"use_scaled_rope": "yes"}, "params.json: use_scaled_rope must be true or false, got 'yes'"),
    ({"vocab_size": 0}, "params.json: vocab_size must be a whole number from 1 to 2097152, got 0"),
])
def test_meta_params_are_checked_before_use(change, message):
    with pytest.raises(UserError) as excinfo:
        meta_config({**TINY_META_PARAMS, **change}, 512, "params.json")
    assert str(excinfo.value) == message


def test_llama2c_model_args_are_checked_before_use(tmp_path):
    torch.save({"model": {}, "model_args": {"dim": 64, "multiple_of": 0, "n_layers": 1, "n_heads": 8,
                                            "vocab_size": 512}}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError) as excinfo:
        convert_llama2c(tmp_path / "ckpt.pt")
    assert str(excinfo.value) == f"{tmp_path / 'ckpt.pt'}: multiple_of must be a whole number from 1 to 65536, got 0"


def test_meta_config_matches_published_params():
    llama_7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}
    llama2_7b = {**llama_7b, "norm_eps": 1e-05}
    llama2_70b = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                  "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
    assert meta_config(llama_7b, 32000, "params.json").name == "llama-7b"
    assert meta_config(llama2_7b, 32000, "params.json") == Config.from_name("llama-2-7b")
    assert meta_config(llama2_70b, 32000, "params.json") == Config.from_name("llama-2-70b")
    assert swiglu_hidden_size(5120, 256) == 13824 and swiglu_hidden_size(8192, 4096, 1.3) == 28672


# ---- safety and tokenizer checks


class WritesAFile:
    """A pickle payload: loading it (unsafely) would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickles_that_carry_code_are_refused(tmp_path):
    pwned = tmp_path / "pwned"
    torch.save({"model": WritesAFile(pwned), "model_args": {}}, tmp_path / "evil.pt")
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "params.json").write_text(json.dumps(TINY_META_PARAMS))
    torch.save({"norm.weight": WritesAFile(pwned)}, meta_dir / "consolidated.00.pth")

    for run in (lambda: convert_llama2c(tmp_path / "evil.pt"), lambda: convert_meta(meta_dir, vocab_size=512)):
        with pytest.raises(UserError) as excinfo:
            run()
        one_line_error(excinfo, "refused")
        assert not pwned.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live: an unsafe load runs it
    assert pwned.exists()


def test_tokenizer_is_found_and_checked(tmp_path, stories260k_bin, llama_tokenizer):
    assert convert("llama2c", stories260k_bin)[2] == {TOKENIZER_FILE: stories260k_bin.parent / "tok512.model"}
    with pytest.raises(UserError) as excinfo:
        convert("llama2c", stories260k_bin, llama_tokenizer)
    one_line_error(excinfo, str(stories260k_bin), "512 tokens", "the tokenizer has 32000")

    lonely = tmp_path / "stories260K.bin"
    lonely.write_bytes(stories260k_bin.read_bytes())
    with pytest.raises(UserError) as excinfo:
        convert("llama2c", lonely)
    one_line_error(excinfo, "no tokenizer.json or tokenizer.model or tok512.model", str(tmp_path))


# ---- the command line

CONVERT = "scripts/convert_checkpoint.py"


def test_cli_converts_llama2c(tmp_path, stories260k_bin):
    result = run_script(CONVERT, "--format", "llama2c", "--checkpoint_path", str(stories260k_bin),
                        "--output_dir", str(tmp_path / "out"), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted([WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE])
    assert read_config(tmp_path / "out").name == "stories260K"
    assert {t.dtype for t in load_file(tmp_path / "out" / WEIGHTS_FILE).values()} == {torch.bfloat16}


def test_cli_reports_errors_in_one_line(tmp_path, capfd):
    missing = tmp_path / "absent.bin"
    result = run_script(CONVERT, "--format", "llama2c", "--checkpoint_path", str(missing),
                        "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {missing} not found"]
    assert not (tmp_path / "out").exists()

    # in this process: the one line of an error from the script's own process is checked just above
    result = run_script_in_this_process(CONVERT, "--format", "hf", "--checkpoint_path", str(tmp_path), "--output_dir",
                                        str(tmp_path), capfd=capfd)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: output_dir {tmp_path} is the source checkpoint: "
                                                  "choose another directory"]


def test_a_file_size_limit_ends_with_one_line_and_no_output(tmp_path, stories260k_bin):
    """A write beyond the file-size limit (EFBIG: ulimit -f, or a file system's largest file) is reported as a full
    disk is, in one line, and leaves nothing behind."""
    out = tmp_path / "out"

    def limit_file_size() -> None:  # in the child: 100 kB, a tenth of the weights
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run([sys.executable, CONVERT, "--format", "llama2c", "--checkpoint_path", str(stories260k_bin),
                             "--output_dir", str(out)], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                            timeout=120, preexec_fn=limit_file_size)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors == [f"error: cannot write {out}/{WEIGHTS_FILE}: the file is larger than the file system or the "
                      "file-size limit (ulimit -f) allows; raise the limit or choose another location (the unfinished "
                      "file was removed)"], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_help_documents_every_option(capfd):
    # in this process: the script runs as its own process in the two tests above
    result = run_script_in_this_process(CONVERT, "--help", capfd=capfd)
    assert result.returncode == 0
    for option in ("--format", "--checkpoint_path", "--output_dir", "--tokenizer_path", "--dtype", "--llama3_release"):
        assert option in result.stdout
    assert "meta,hf,llama2c,gguf" in result.stdout and "tok512.model" in result.stdout
