"""Shared benchmark harness: timing (medians after warm-up; CUDA events on GPU), one CSV schema, plots.

CSV columns: name, provider, mode, metric, unit, x, p50, p20, p80, device, versions, timestamp.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

COLUMNS = ("name", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80", "device", "versions",
           "timestamp")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def versions() -> str:
    import mindskip_kernels

    return f"torch={torch.__version__} mindskip={mindskip_kernels.__version__}"


@dataclass
class Row:
    name: str
    provider: str
    mode: str
    metric: str
    unit: str
    x: str
    p50: float
    p20: float
    p80: float
    device: str
    versions: str = field(default_factory=versions)
    timestamp: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))


def measure(fn: Callable[..., object], device: torch.device, *, warmup: int = 3, repeats: int = 10,
            min_time_s: float = 0.0, setup: Callable[[], object] | None = None) -> tuple[float, float, float]:
    """(p50, p20, p80) of fn's wall time in milliseconds; CUDA events on GPU. With `setup`, each call is
    fn(setup()) and only fn is timed (e.g. a decode loop after an untimed prefill)."""
    def once() -> float:
        args = () if setup is None else (setup(),)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        once()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time_s:
        times.append(once())
    return percentiles(times)


def measure_pair(a: Callable[[], object], b: Callable[[], object], *, warmup: int = 2, repeats: int = 10
                 ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(p50, p20, p80) in ms of two CPU calls timed alternately (a, b, a, b, ...), so that a drifting shared
    machine slows both alike: for a ratio of the two."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1e3)
    return percentiles(times[0]), percentiles(times[1])


def percentiles(times: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of some times (one time: that time thrice)."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def write_csv(rows: list[Row], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A plain aligned text table (markdown-compatible)."""
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
