"""Speed measurement in the manner of trtexec: warm-up, many timed iterations, percentiles.

GPU runtimes (``runtime.on_gpu``) are timed step by step with CUDA events on their stream: H2D,
GPU compute and D2H separately, and end to end (H2D + compute + D2H, host wall clock), optionally
with the compute replayed from a CUDA graph. CPU runtimes have no transfers: their end-to-end
latency is ``predict`` on a preprocessed batch, and that is also their compute time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Stats:
    """Latency statistics in milliseconds (trtexec reports mean, median and percentiles)."""

    mean: float
    median: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, ms: list[float] | np.ndarray) -> "Stats":
        a = np.asarray(ms, dtype=np.float64)
        return cls(float(a.mean()), float(np.median(a)), float(np.percentile(a, 90)), float(np.percentile(a, 99)),
                   float(a.min()), float(a.max()))


@dataclass
class SpeedResult:
    """One backend at one batch size."""

    backend: str
    batch: int
    iterations: int
    end_to_end: Stats  # per batch, host wall clock, including transfers
    throughput: float  # images per second, end to end (iterations x batch / total wall time)
    compute: Stats | None = None  # GPU compute only (CUDA events); None for CPU runtimes
    h2d: Stats | None = None
    d2h: Stats | None = None
    compute_throughput: float | None = None  # images per second from the median GPU compute time
    cuda_graph: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed_iterations(step, warmup: int, iterations: int, min_seconds: float) -> tuple[list[float], float]:
    for _ in range(warmup):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < iterations or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 100 * iterations:  # a very fast backend must not run forever
            break
    return times, time.perf_counter() - start


def time_cpu(runtime, images: np.ndarray, name: str, warmup: int = 3, iterations: int = 20,
             min_seconds: float = 0.0) -> SpeedResult:
    """End-to-end ``predict`` latency of a CPU runtime on one preprocessed batch."""
    times, total = _timed_iterations(lambda: runtime.predict(images), warmup, iterations, min_seconds)
    b = len(images)
    return SpeedResult(name, b, len(times), Stats.of(times), b * len(times) / total)


def time_gpu(runtime, images: np.ndarray, name: str, warmup: int = 10, iterations: int = 200,
             min_seconds: float = 0.0, cuda_graph: bool = False) -> SpeedResult:
    """trtexec-style timing of a GPU runtime: H2D, compute and D2H by CUDA events, end to end by wall clock."""
    import torch

    b = len(images)
    runtime.set_batch(b)
    notes = []
    used_graph = False
    if cuda_graph and hasattr(runtime, "capture_cuda_graph"):
        runtime.upload(images)
        try:
            runtime.capture_cuda_graph()
            used_graph = True
        except Exception as exc:  # noqa: BLE001  (not every engine can be captured; report and go on)
            notes.append(f"CUDA graph capture failed ({type(exc).__name__}); timed without")
    stream = runtime.stream

    def e2e() -> None:
        runtime.upload(images)
        runtime.execute()
        runtime.download()
        runtime.synchronize()

    times, total = _timed_iterations(e2e, warmup, iterations, min_seconds)

    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(iterations)]
    for ev in events:
        ev[0].record(stream)
        runtime.upload(images)
        ev[1].record(stream)
        runtime.execute()
        ev[2].record(stream)
        runtime.download()
        ev[3].record(stream)
    runtime.synchronize()
    h2d = [ev[0].elapsed_time(ev[1]) for ev in events]
    compute = [ev[1].elapsed_time(ev[2]) for ev in events]
    d2h = [ev[2].elapsed_time(ev[3]) for ev in events]
    compute_stats = Stats.of(compute)
    return SpeedResult(
        name, b, len(times), Stats.of(times), b * len(times) / total, compute=compute_stats,
        h2d=Stats.of(h2d), d2h=Stats.of(d2h), compute_throughput=b * 1e3 / compute_stats.median,
        cuda_graph=used_graph or bool(getattr(runtime, "compiled", False)), notes=notes,
    )


def time_runtime(runtime, images: np.ndarray, name: str, warmup: int, iterations: int, min_seconds: float = 0.0,
                 cuda_graph: bool = True) -> SpeedResult:
    """Dispatch on where the runtime computes."""
    if getattr(runtime, "on_gpu", False):
        return time_gpu(runtime, images, name, warmup, iterations, min_seconds, cuda_graph)
    return time_cpu(runtime, images, name, warmup, iterations, min_seconds)
