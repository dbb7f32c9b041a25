"""Files written by earlier versions keep loading: a checkpoint folder whose model_config.yaml still holds the adapter
shape, and an adapter file of that time (tests/fixtures/written_by_0e354f2, made by the code at commit 0e354f2)."""

from pathlib import Path

import torch

from lit_adapter.checkpoint import adapter_config, adapter_prompt_style, load_adapter, load_config, load_model
from lit_adapter.config import Config

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
