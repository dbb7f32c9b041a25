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
def losses(tmp_path_factory) -> dict[tuple[str, str], float]:
    """The validation loss of each (base, adapter trained on that base or "" for none) that the bounds compare: the
    converted model, the Alpaca records prepared for it (35 for validation, at most its 256 positions), 16 steps on
    its float32 and its NF4 base."""
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
    pairs = [("32-true", ""), ("nf4-base", ""), ("32-true", "32-true"), ("nf4-base", "nf4-base"),
             ("32-true", "nf4-base")]
    return {(base, trained_on): loss(checkpoint, data, base, adapters.get(trained_on)) for base, trained_on in pairs}


def test_the_tokenizer_is_the_models(losses):
    assert losses["32-true", ""] < math.log(512) - 1  # another vocabulary would predict about as chance


def test_an_nf4_base_starts_within_2_percent_of_the_float32_base(losses):
    full, nf4 = losses["32-true", ""], losses["nf4-base", ""]
    assert abs(nf4 / full - 1) < 0.02, (full, nf4)


def test_on_an_nf4_base_16_steps_learn_90_percent_and_the_adapter_carries_over_within_2_percent(losses):
    full_drop = losses["32-true", ""] - losses["32-true", "32-true"]
    nf4_drop = losses["nf4-base", ""] - losses["nf4-base", "nf4-base"]
    assert full_drop > 0 and nf4_drop >= 0.9 * full_drop, (full_drop, nf4_drop)
    on_full, trained_on_nf4 = losses["32-true", "nf4-base"], losses["nf4-base", "nf4-base"]
    assert abs(on_full / trained_on_nf4 - 1) < 0.02, (on_full, trained_on_nf4)
