"""nf4-base's quality bounds (issue 25) on a real model trained in float32: the TinyStories model that llama2.c's
train.py made in 500 iterations (../shared/data/tinystories_llama2c_500iter: dim 64, MLP 192, 5 layers, a
vocabulary of 512), with Karpathy's tok512 tokenizer (stories260K's: llama2.c's 512-token TinyStories vocabulary,
which this model was trained on; it continues "Once upon a time" fluently with it), fine-tuned on the real Alpaca
records as bench/quantized_quality.py does. SmolLM2, the other real model, came from a 4-bit file, which NF4 rounds
a second time (bench/RESULTS.md).
"""

import math

import pytest
import torch

from bench.quantized_quality import fine_tune, loss
from conftest import convert_in_this_process, shared_file
from lit_adapter.data.prepare import prepare_dataset
from lit_adapter.data.records import load_records
from lit_adapter.tokenizer import Tokenizer

STEPS = 16


@pytest.fixture(scope="module")
def tinystories(tmp_path_factory) -> dict:
    """The converted model, the Alpaca records prepared for it (35 for validation, at most its 256 positions), and
    the adapters of 16 steps on its float32 and its NF4 base."""
    pytest.importorskip("torchao", reason="nf4-base needs torchao")
    root = tmp_path_factory.mktemp("tinystories_500iter")
    checkpoint, data = root / "checkpoint", root / "data"
    convert_in_this_process("--format", "llama2c", "--output_dir", str(checkpoint),
                            "--checkpoint_path", str(shared_file("tinystories_llama2c_500iter/model.bin")),
                            "--tokenizer_path", str(shared_file("stories260K/tok512.model")))
    records, _ = load_records(shared_file("alpaca/alpaca_data_first335.json"), skip_bad_records=True)
    prepare_dataset(records, Tokenizer(checkpoint), data, val_size=35, max_seq_length=256, style="alpaca")
    adapters = {precision: fine_tune(checkpoint, data, root / precision, precision, STEPS, None, torch.device("cpu"))
                for precision in ("32-true", "nf4-base")}
    return {"checkpoint": checkpoint, "data": data, "adapters": adapters}


def val_loss(tinystories: dict, precision: str, adapter_of: str = "") -> float:
    """The validation loss of the base in ``precision``, with the adapter trained on ``adapter_of``'s base if given."""
    return loss(tinystories["checkpoint"], tinystories["data"], precision, tinystories["adapters"].get(adapter_of))


def test_the_tokenizer_is_the_models(tinystories):
    assert val_loss(tinystories, "32-true") < math.log(512) - 1  # another vocabulary would predict about as chance


def test_an_nf4_base_starts_within_2_percent_of_the_float32_base(tinystories):
    full, nf4 = val_loss(tinystories, "32-true"), val_loss(tinystories, "nf4-base")
    assert abs(nf4 / full - 1) < 0.02, (full, nf4)


def test_on_an_nf4_base_16_steps_learn_90_percent_and_the_adapter_carries_over_within_2_percent(tinystories):
    full_drop = val_loss(tinystories, "32-true") - val_loss(tinystories, "32-true", adapter_of="32-true")
    trained_on_nf4 = val_loss(tinystories, "nf4-base", adapter_of="nf4-base")
    nf4_drop = val_loss(tinystories, "nf4-base") - trained_on_nf4
    assert full_drop > 0 and nf4_drop >= 0.9 * full_drop, (full_drop, nf4_drop)
    on_full = val_loss(tinystories, "32-true", adapter_of="nf4-base")
    assert abs(on_full / trained_on_nf4 - 1) < 0.02, (on_full, trained_on_nf4)
