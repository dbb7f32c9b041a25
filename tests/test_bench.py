"""The training bench's profile output (its speed figures come from GPU runs, never from tests)."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import train_throughput
from bench.common import STEP_MARK, host_calls_at, idle_gaps, on_device, steps_span
from lit_adapter.errors import UserError

CPU_SMOKE = dict(preset="tiny", accelerator="cpu", compile=False, micro_batch_size=2, seq_length=16, warmup_steps=0,
                 steps=1, runs=1)

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA


def event(name, start, end, device=CPU, annotation=False, parent=None):
    """A stand-in for a profiler event: what bench.common reads of one."""
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                           is_user_annotation=annotation, cpu_parent=parent)


def test_profile_writes_the_profiled_steps_as_a_chrome_trace(tmp_path, capsys):
    trace = tmp_path / "steps.json"
    train_throughput.main(**CPU_SMOKE, profile=True, trace_path=trace)
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::scaled_dot_product_attention" for e in events)
    out = capsys.readouterr().out
    assert "| fixed 2 x 16 |" in out and "GPU time per token 0.0 us over 96 tokens" in out  # 3 steps of 2 x 16


def test_the_bench_counts_the_micro_batch_shapes_and_those_new_after_the_warm_up(tmp_path, capsys, alpaca_json,
                                                                                llama_tokenizer):
    train_throughput.main(**{**CPU_SMOKE, "warmup_steps": 1})
    assert "micro-batch shapes: 1 (0 first seen in the timed steps)" in capsys.readouterr().out  # one fixed shape
    recipe = dict(alpaca=True, global_batch_size=8, micro_batch_size=None, micro_batch_tokens=256, seq_length=128,
                  dataset_size=200, warmup_steps=3, steps=2, runs=2, data_file=alpaca_json,
                  tokenizer_path=llama_tokenizer)
    train_throughput.main(**{**CPU_SMOKE, **recipe})
    out = capsys.readouterr().out
    # the same steps through the data pipeline alone
    prepared = train_throughput.alpaca_data(tmp_path, alpaca_json, llama_tokenizer, 128, 200, vocab_size=512)
    steps = iter(train_throughput.InstructionDataModule(prepared, 8, None, 256).train_steps())
    shapes = [{tuple(x.shape) for x, _ in next(steps)[0]} for _ in range(3 + 2 * 2)]
    warm, later = set().union(*shapes[:3]), set().union(*shapes[3:])
    assert len(warm | later) > 1
    assert f"micro-batch shapes: {len(warm | later)} ({len(later - warm)} first seen in the timed steps)" in out


def test_a_trace_path_without_profile_is_refused(tmp_path):
    with pytest.raises(UserError, match="--trace_path writes the profiled steps: add --profile true"):
        train_throughput.main(**CPU_SMOKE, trace_path=tmp_path / "steps.json")
    assert not (tmp_path / "steps.json").exists()


def test_a_seq_length_beyond_the_block_size_is_refused():
    with pytest.raises(UserError, match="--seq_length 129 exceeds tiny's block_size 128"):
        train_throughput.main(**{**CPU_SMOKE, "seq_length": 129})


def test_logged_runs_end_with_the_gpus_median_clock_and_power(tmp_path):
    samples = tmp_path / "run.gpu.csv"
    samples.write_text("1980, 650.5\n1755, 699.0\n[N/A], [N/A]\n1830, 640.0\n")
    script = Path(__file__).resolve().parents[1] / "bench" / "logged_run.sh"
    line = subprocess.run(["bash", "-c", f"source {script}; gpu_medians {samples}"], capture_output=True, text=True,
                          check=True).stdout
    assert line == "GPU while it ran: SM clock median 1830 MHz (min 1755), power median 650 W, 3 samples\n"


def test_idle_gaps_are_the_uncovered_intervals_longer_than_the_minimum():
    busy = [(0, 10), (5, 20), (50, 60), (61, 70), (100, 130), (120, 125)]
    assert idle_gaps(busy, min_gap=5) == [(20, 50), (70, 100)]
    assert idle_gaps([], min_gap=5) == []


def test_the_gpu_timeline_holds_kernels_not_the_step_annotation_drawn_over_them():
    kernel = event("kernel", 0, 1, CUDA)
    annotation = event(STEP_MARK, 0, 1, CUDA, annotation=True)  # STEP_MARK as the GPU's timeline shows it
    host = event("aten::mm", 0, 1)
    assert [on_device(e) for e in (kernel, annotation, host)] == [True, False, False]


def test_the_profiled_wall_runs_from_the_first_step_to_the_last_gpu_event_without_the_profilers_start_and_stop():
    steps = [event(STEP_MARK, 1_000, 2_000), event(STEP_MARK, 2_000, 3_000), event("profiler start", 0, 900)]
    gpu = [event("kernel", 1_500, 4_500, CUDA), event(STEP_MARK, 1_400, 9_000, CUDA, annotation=True)]
    assert steps_span(steps + gpu) == 3_500 / 1e6  # the kernel's end, not the annotation's on the GPU's timeline
    assert steps_span(steps) == 2_000 / 1e6  # no GPU: the steps themselves


def test_a_gap_is_named_by_the_outermost_and_innermost_host_calls_running_then():
    step = event(STEP_MARK, 0, 100)
    loader = event("DataLoader.__next__", 10, 40, parent=step)
    pin = event("aten::pin_memory", 20, 30, parent=loader)
    done = event("aten::mm", 41, 45, parent=step)
    host = [step, loader, pin, done]
    starts = [e.time_range.start for e in host]
    assert host_calls_at(host, starts, 25) == "DataLoader.__next__ > aten::pin_memory"
    assert host_calls_at(host, starts, 35) == "DataLoader.__next__"
    assert host_calls_at(host, starts, 50) == f"{STEP_MARK}'s own Python"
    assert host_calls_at(host, starts, 150) == "(between the profiled steps)"
