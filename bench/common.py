"""Helpers shared by the benchmarks: random-weight models on the GPU, timing, the memory ceiling and profiles."""

import bisect
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from lit_adapter.adapter import mark_only_adapter_trainable
from lit_adapter.checkpoint import build_model
from lit_adapter.config import Config
from lit_adapter.errors import message_line
from lit_adapter.model import LLaMA, init_weights
from lit_adapter.quantize import frozen_linears
from lit_adapter.quantize.low_bit import int4_round_trip


def random_model(config: Config, adapter: bool, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 quantize: Optional[Callable[[torch.nn.Module], int]] = None) -> LLaMA:
    """A model with random weights in ``dtype`` (adapter in float32, with small random gates), built on ``device``
    part by part as ``load_model`` builds it (each block stored by ``quantize`` before the next is made)."""
    model = build_model(config, adapter, device, dtype, lambda prefix, part: init_weights(part), quantize)
    if adapter:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("adapter_gate"):
                    param.normal_(std=0.1)  # non-zero, so the adapter path is really exercised
        mark_only_adapter_trainable(model)
    return model


def int4_reference(block: torch.nn.Module, group_size: Optional[int] = None) -> int:
    """A quantizer that keeps plain weights: the block's frozen weights as int4-base stores them (in groups of
    ``group_size``, default each weight's own), dequantized. It measures int4-base's quality where its kernel cannot
    run, and the kernel's own error where it can."""
    return replace_weights(block, lambda weight: int4_round_trip(weight, group_size))


def replace_weights(block: torch.nn.Module, values: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Each frozen linear weight of ``block`` replaced by ``values(weight)``, a plain tensor in the weight's dtype;
    return their count."""
    linears = frozen_linears(block)
    for _, _, linear in linears:
        weight = linear.weight.detach()
        linear.weight = torch.nn.Parameter(values(weight).to(weight.dtype), requires_grad=False)
    return len(linears)


def frozen_linear(weight: torch.Tensor) -> torch.nn.Linear:
    """A bias-free linear layer with a copy of ``weight``, frozen."""
    linear = torch.nn.Linear(weight.size(1), weight.size(0), bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    return linear


def relative_error(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, expected: torch.Tensor) -> float:
    """The norm of ``layer(x)``'s difference from ``expected`` (float32), relative to ``expected``'s."""
    with torch.no_grad():
        return ((layer(x).float() - expected).norm() / expected.norm()).item()


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's saved state (parameters and persistent buffers) as stored: a quantized weight counts
    its packed values and scales."""
    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()
    return sum(size(t) for t in model.state_dict().values())


def cuda_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls, each timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def copy_bandwidth(gib: float = 4.0) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second): the memory ceiling."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / median(cuda_time(lambda: dst.copy_(src), repeats=10, warmup=3))


def attempt(measure: Callable[[], Any]) -> Any:
    """``measure()``, or where it fails (a missing library, what a layer cannot run) a one-line "failed: ..."."""
    try:
        return measure()
    except Exception as failure:
        return f"failed: {message_line(failure)[:200]}"


def cell(value: Union[float, str], digits: int) -> str:
    """A figure with ``digits`` decimals, or the failure that ``attempt`` returned in its place."""
    return value if isinstance(value, str) else f"{value:.{digits}f}"


STEP_MARK = "profiled step"
"""The host call around each profiled step: an idle interval inside it and in no other call is the step's Python."""


def print_profile(step: Callable[[], object], sync: Callable[[], None], steps: int = 3, top: int = 12,
                  trace_path: Optional[Path] = None, tokens_of: Optional[Callable[[object], int]] = None) -> None:
    """The share of wall time the GPU computes over ``steps`` calls of ``step``, and the ``top`` kernels by time;
    with ``tokens_of`` (the tokens of a step's result), the GPU's time per token, which compares shapes without the
    idle time; with ``trace_path``, the profiled calls are also written there as a Chrome trace (Perfetto,
    chrome://tracing)."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        results = []
        for _ in range(steps):
            with torch.profiler.record_function(STEP_MARK):
                results.append(step())
        sync()
    wall = steps_span(prof.events())
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    events = prof.key_averages()
    kernels = [e for e in events if on_device(e)]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    print(f"GPU busy {busy:.2f} s of {wall:.2f} s wall ({busy / wall:.0%}) over {steps} steps (profiled)")
    if tokens_of is not None:
        tokens = sum(map(tokens_of, results))
        print(f"GPU time per token {busy / tokens * 1e6:.1f} us over {tokens:,} tokens")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        mean_us = e.self_device_time_total / e.count
        print(f"{e.self_device_time_total / 1e6 / busy:6.1%} {e.count:6d}x {mean_us:8.1f} us  {e.key[:100]}")
    host = [e for e in events if on_host(e)]
    print("host time by call (self):")
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"{e.self_cpu_time_total / 1e6 / wall:6.1%} {e.count:6d}x  {e.key[:110]}")
    print_idle_gaps(prof.events(), wall)


def print_idle_gaps(events: list, wall: float, min_gap_us: float = 20.0, top: int = 8) -> None:
    """Where the GPU waits: its idle intervals of at least ``min_gap_us`` between the first and last device event,
    by what the host was running in each one's middle (the outermost call > the innermost)."""
    device = [(e.time_range.start, e.time_range.end) for e in events if on_device(e)]
    host = sorted(filter(on_host, events), key=lambda e: e.time_range.start)
    gaps = idle_gaps(device, min_gap_us)
    if not gaps:
        return
    starts, causes = [e.time_range.start for e in host], Counter()
    for start, end in gaps:
        causes[host_calls_at(host, starts, (start + end) / 2)] += end - start
    total = sum(end - start for start, end in gaps) / 1e6
    print(f"GPU idle {total:.3f} s ({total / wall:.0%} of wall) in {len(gaps)} gaps of >= {min_gap_us:.0f} us, "
          "by what the host ran then:")
    for calls, idle in causes.most_common(top):
        print(f"{idle / 1e6 / wall:6.1%}  {calls[:120]}")


def steps_span(events: list) -> float:
    """The profiled steps' wall time in seconds, without the profiler's own start and stop: from the first
    ``STEP_MARK``'s start on the host to the end of the last GPU event (of the last mark where the GPU ran none)."""
    marks = [e for e in events if e.name == STEP_MARK and on_host(e)]
    ends = [e.time_range.end for e in events if on_device(e)] or [e.time_range.end for e in marks]
    return (max(ends) - min(e.time_range.start for e in marks)) / 1e6


def on_host(event: object) -> bool:
    """Whether a profiler event is the host's (a call on the CPU, or an annotation as the host recorded it)."""
    return event.device_type == torch.autograd.DeviceType.CPU


def on_device(event: object) -> bool:
    """Whether a profiler event is the GPU's work (a kernel, copy or set), not a host annotation such as
    ``STEP_MARK`` that the profiler also draws on the GPU's timeline (over everything the step ran)."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def idle_gaps(busy: list[tuple[float, float]], min_gap: float) -> list[tuple[float, float]]:
    """The intervals longer than ``min_gap`` that no (start, end) interval of ``busy`` covers, between the first
    start and the last end."""
    gaps, reached = [], None
    for start, end in sorted(busy):
        if reached is not None and start - reached > min_gap:
            gaps.append((reached, start))
        reached = end if reached is None else max(reached, end)
    return gaps


def host_calls_at(host: list, starts: list[float], time_us: float) -> str:
    """"outermost > innermost" of the host calls (profiler events sorted by their ``starts``) running at
    ``time_us``."""
    i = bisect.bisect_right(starts, time_us) - 1
    while i >= 0 and host[i].time_range.end <= time_us:  # the innermost running call started last
        i -= 1
    if i < 0:
        return "(between the profiled steps)"
    chain = [host[i]]
    while chain[-1].cpu_parent is not None:
        chain.append(chain[-1].cpu_parent)
    names = [e.name for e in chain if e.name != STEP_MARK] or [f"{STEP_MARK}'s own Python"]
    return names[0] if len(names) == 1 else f"{names[-1]} > {names[0]}"
