"""The training bench's profile output (its speed figures come from GPU runs, never from tests)."""

import json

import pytest

from bench import train_throughput
from lit_adapter.errors import UserError

CPU_SMOKE = dict(preset="tiny", accelerator="cpu", compile=False, micro_batch_size=2, seq_length=16, warmup_steps=0,
                 steps=1, runs=1)


def test_profile_writes_the_profiled_steps_as_a_chrome_trace(tmp_path, capsys):
    trace = tmp_path / "steps.json"
    train_throughput.main(**CPU_SMOKE, profile=True, trace_path=trace)
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::scaled_dot_product_attention" for e in events)
    assert "| fixed 2 x 16 |" in capsys.readouterr().out


def test_a_trace_path_without_profile_is_refused(tmp_path):
    with pytest.raises(UserError, match="--trace_path writes the profiled steps: add --profile true"):
        train_throughput.main(**CPU_SMOKE, trace_path=tmp_path / "steps.json")
    assert not (tmp_path / "steps.json").exists()
