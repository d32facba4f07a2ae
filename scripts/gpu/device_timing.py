"""Timing for the GPU benchmark scripts: calls replayed in a CUDA graph, timed with CUDA events.

Each benchmark passes a list of calls (usually the same operation on rotating copies of its
weights, so they come from memory rather than L2); the time is per call, the median of
``repeats`` replays. On the CPU (dry runs) the calls are timed with ``perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def graph_time_us(calls: list[Callable[[], object]], device: str, repeats: int = 5) -> float:
    """Median microseconds per call of ``calls`` replayed in one CUDA graph (one warm-up pass first)."""
    for call in calls:
        call()
    if device != "cuda":
        return _wall_us(calls)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm the graph pool's allocator
            call()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    per_call = events_us(graph.replay, repeats) / len(calls)
    del graph
    return per_call


def eager_time_us(calls: list[Callable[[], object]], device: str, repeats: int = 5) -> float:
    """Median microseconds per call of ``calls`` launched one by one."""
    if device != "cuda":
        return _wall_us(calls)
    return events_us(lambda: [call() for call in calls], repeats) / len(calls)


def events_us(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    size = 2**30 if device == "cuda" else 2**24
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = graph_time_us([lambda: dst.copy_(src)] * 10, device) / 1e6
    return 2 * size / seconds / 1e9


def _wall_us(calls: list[Callable[[], object]]) -> float:
    start = time.perf_counter()
    for call in calls:
        call()
    return (time.perf_counter() - start) / len(calls) * 1e6
