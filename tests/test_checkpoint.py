"""Checkpoint folders: files written by earlier versions keep loading (a checkpoint folder whose model_config.yaml
still holds the adapter shape, and an adapter file of that time: tests/fixtures/written_by_0e354f2, made by the code at
commit 0e354f2), a config is checked against the weights before the model is allocated, and a base is told from
another of its shape by its fingerprint."""

from pathlib import Path

import pytest
import torch
import yaml

from conftest import another_sentencepiece_model

from lit_adapter.adapter import AdapterConfig, AdapterLLaMA
from lit_adapter.checkpoint import (CONFIG_FILE, adapter_config, adapter_prompt_style, check_adapter_base, load_adapter,
                                    load_config, load_model, open_checkpoint, save_adapter, save_checkpoint_dir)
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.model import LLaMA

WRITTEN_BY_0E354F2 = Path(__file__).parent / "fixtures" / "written_by_0e354f2"
ROUNDING = {"rtol": 1e-5, "atol": 1e-6}  # float rounding only: the logits were computed for a longer batch then


def test_a_folder_and_an_adapter_of_0e354f2_give_the_logits_they_gave_then():
    folder, adapter = WRITTEN_BY_0E354F2 / "checkpoint", WRITTEN_BY_0E354F2 / "adapter.safetensors"
    expected = torch.load(WRITTEN_BY_0E354F2 / "logits.pt", weights_only=True)
    base = load_config(folder)
    assert type(base) is Config and base.name == "tiny"  # the adapter keys of its model_config.yaml are ignored
    config = adapter_config(adapter, base)
    assert (config.adapter_prompt_length, config.adapter_start_layer) == (3, 1)
    assert adapter_prompt_style(adapter) == "alpaca"
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder).eval()(expected["idx"]), expected["base_logits"], **ROUNDING)
        model = load_model(folder, adapter=True, config=config).eval()
        load_adapter(model, adapter)
        torch.testing.assert_close(model(expected["idx"]), expected["adapter_logits"], **ROUNDING)


def test_a_config_that_its_weights_do_not_have_is_refused_before_anything_is_allocated(tmp_path):
    """A model_config.yaml within every range but far larger than its weights (petabytes, were it allocated) is
    checked against the stored tensors first."""
    config = Config.from_name("tiny")
    save_checkpoint_dir(LLaMA(config).state_dict(), config, None, tmp_path)
    huge = {**yaml.safe_load((tmp_path / CONFIG_FILE).read_text()), "n_layer": 1024, "n_head": 1024,
            "n_kv_head": 1024, "n_embd": 65536, "intermediate_size": 262144}
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(huge))
    with pytest.raises(UserError, match=rf"^{tmp_path}/model\.safetensors does not fit the model tiny: missing keys "
                                        r"\[blocks\.10\.attn\.proj\.weight, .*\(6126 in all\)\]"):
        load_model(tmp_path)


def test_a_base_fingerprint_keeps_through_float_dtypes_and_tells_other_weights_and_tokenizers(tmp_path, tok512):
    """The fingerprint is the same for the weights stored in float32 or bfloat16, and differs for another model of
    the same shape (one first row changed) and for another tokenizer of the same size."""
    config = Config.from_name("tiny")
    weights = LLaMA(config).state_dict()
    other_weights = {**weights, "blocks.2.mlp.down.weight": weights["blocks.2.mlp.down.weight"] * 1.01}
    other_tokenizer = another_sentencepiece_model(tok512, tmp_path / "other.model")
    folders = {"float32": (weights, tok512), "bfloat16": ({k: v.bfloat16() for k, v in weights.items()}, tok512),
               "other weights": (other_weights, tok512), "other tokenizer": (weights, other_tokenizer)}
    fingerprints = {}
    for name, (state_dict, tokenizer) in folders.items():
        save_checkpoint_dir(state_dict, config, tokenizer, tmp_path / name)
        fingerprints[name] = open_checkpoint(tmp_path / name).fingerprint
    assert fingerprints["bfloat16"] == fingerprints["float32"]
    assert fingerprints["other weights"]["weights"] != fingerprints["float32"]["weights"]
    assert fingerprints["other weights"]["tokenizer"] == fingerprints["float32"]["tokenizer"]
    assert fingerprints["other tokenizer"]["weights"] == fingerprints["float32"]["weights"]
    assert fingerprints["other tokenizer"]["tokenizer"] != fingerprints["float32"]["tokenizer"]

    adapter = tmp_path / "adapter.safetensors"
    save_adapter(adapter, AdapterLLaMA(AdapterConfig.of(config)), config, fingerprint=fingerprints["float32"])
    check_adapter_base(adapter, open_checkpoint(tmp_path / "bfloat16"))
    for name in ("other weights", "other tokenizer"):
        part = name.split()[1]
        expected = (rf"^{adapter} was trained on another base than {tmp_path / name}: {part} fingerprint "
                    rf"{fingerprints['float32'][part]} vs {fingerprints[name][part]} \(same shape, other weights or "
                    r"tokenizer\): use the base it was trained on, or pass --allow_other_base true to use it anyway$")
        with pytest.raises(UserError, match=expected):
            check_adapter_base(adapter, open_checkpoint(tmp_path / name))
    save_adapter(adapter, AdapterLLaMA(AdapterConfig.of(config)), config)  # as files from before fingerprints
    check_adapter_base(adapter, open_checkpoint(tmp_path / "other weights"))
