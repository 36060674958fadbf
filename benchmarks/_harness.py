"""Timing, environment and CSV helpers shared by the ``bench_<op>.py`` scripts.

* CPU: :class:`torch.utils.benchmark.Timer` (``blocked_autorange``), median
  per round; ours and torch are timed in *interleaved* rounds and the median
  over rounds is kept, so a background load or the allocator's history
  affects both sides alike.
* GPU: ``triton.testing.do_bench`` (median, 20/80 quantiles) when Triton is
  installed, else CUDA events.

Every row of a CSV carries the environment it was measured in (device, CPU
name, thread count, library versions, command line, date), so a table can
always be traced back to the run that made it. Tables and plots are rendered
from the CSV by ``benchmarks/plot.py``, never typed.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

# One schema for every benchmark CSV: the case, the two timings, the
# environment. ``ratio`` is torch_ms / ours_ms: above 1 means we are faster.
FIELDS = [
    "op", "case", "pass", "shape", "dtype", "memory_format", "activation", "backend",
    "torch_ms", "ours_ms", "ratio", "torch_q20_ms", "torch_q80_ms", "ours_q20_ms",
    "ours_q80_ms", "ours_gbps", "ours_pct_peak", "torch_faults", "ours_faults",
    "ours_max_rel_err", "torch_max_rel_err", "allocation", "others_cpu",
    "device", "device_name", "threads", "peak_gbps", "torch", "triton", "batchnorm", "python",
    "loadavg", "command", "date",
]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the 20/80 % quantiles over rounds or runs."""

    median: float
    q20: float
    q80: float
    faults: float = float("nan")  # minor page faults per call (CPU only)
    others_cpu: float = float("nan")  # busiest share of the CPUs other processes took


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process) from ``/proc``."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        # user, nice, system, irq, softirq, steal: niced processes count too
        # (with the kernel's autogroup, nice only ranks tasks within a session).
        total_busy = sum(int(v) for i, v in enumerate(fields) if i in (0, 1, 2, 5, 6, 7))
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return total_busy, int(own[11]) + int(own[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def others_cpu(interval: float = 0.3) -> float:
    """Share of all CPUs (0..1) that *other* processes used over ``interval`` seconds.

    On a shared machine a second process on one of two cores stalls every
    parallel region of ours and torch's alike (a thread waits for the
    preempted one), so rounds are only timed when this is low. ``nan`` where
    ``/proc`` is missing.
    """
    a = _cpu_ticks()
    time.sleep(interval)
    b = _cpu_ticks()
    if a is None or b is None:
        return float("nan")
    hz = os.sysconf("SC_CLK_TCK")
    others = (b[0] - a[0]) - (b[1] - a[1])
    return max(0.0, others / hz / interval / (os.cpu_count() or 1))


def wait_until_quiet(threshold: float = 0.1, timeout: float = 120.0) -> float:
    """Sleep until other processes use less than ``threshold`` of the CPUs.

    Returns the last share measured (above ``threshold`` if ``timeout`` ran out).
    """
    deadline = time.monotonic() + timeout
    load = others_cpu()
    while load > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
        load = others_cpu()
    return load


def cpu_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return ""
    return getattr(mod, "__version__", "")


def environment(device: str = "cpu", peak_gbps: float | None = None) -> dict[str, str]:
    """The columns every row repeats: where, with what and how it was measured."""
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = ""
    return {
        "device": device,
        "device_name": device_name(device),
        "threads": str(torch.get_num_threads()),
        "peak_gbps": "" if peak_gbps is None else f"{peak_gbps:.1f}",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "batchnorm": _version("batchnorm"),
        "python": platform.python_version(),
        "loadavg": load,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_per_call(fn: Callable[[], object], calls: int = 5) -> float:
    """Minor page faults per call: how often fresh memory had to be mapped in."""
    fn()
    start = _minor_faults()
    for _ in range(calls):
        fn()
    return (_minor_faults() - start) / calls


def time_cpu(fn: Callable[[], object], min_run_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` with ``torch.utils.benchmark.Timer``."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_gpu(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Median and 20/80 % quantiles in seconds on a CUDA device.

    ``triton.testing.do_bench`` when Triton is installed (it flushes the L2
    cache between runs), else CUDA events around single calls.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(med / 1e3, q20 / 1e3, q80 / 1e3)
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(10, int(rep_ms))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    q = statistics.quantiles(times, n=10)
    return Timing(statistics.median(times), q[1], q[7])


def compare(fns: dict[str, Callable[[], object]], device: str = "cpu", rounds: int = 3,
            min_run_time: float = 0.2, quiet: float | None = 0.1) -> dict[str, Timing]:
    """Time each function, interleaved: round 1 of every side, then round 2...

    On CPU each round is one ``blocked_autorange`` median; the result is the
    median over rounds with the 20/80 % quantiles of the rounds. With
    ``quiet``, each round waits until other processes use less than that share
    of the CPUs (:func:`wait_until_quiet`); the busiest share seen is recorded.
    """
    if device.startswith("cuda"):
        return {name: time_gpu(fn) for name, fn in fns.items()}
    for fn in fns.values():  # warm-up: first-call costs, allocator state
        fn()
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    busiest = 0.0
    for _ in range(rounds):
        if quiet is not None:
            busiest = max(busiest, wait_until_quiet(quiet))
        for name, fn in fns.items():
            per_round[name].append(time_cpu(fn, min_run_time))
    out = {}
    for name, fn in fns.items():
        times = sorted(per_round[name])
        q20 = times[round(0.2 * (len(times) - 1))]
        q80 = times[round(0.8 * (len(times) - 1))]
        out[name] = Timing(statistics.median(times), q20, q80, faults_per_call(fn), busiest)
    return out


def measure_peak_gbps(device: str = "cpu", nbytes: int = 256 * 2**20) -> float:
    """Bandwidth of a large ``copy_`` (bytes read + written per second), best of five."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.startswith("cuda"):
        best = time_gpu(lambda: dst.copy_(src)).median
    else:
        best = min(time_cpu(lambda: dst.copy_(src), 0.05) for _ in range(5))
    return 2 * nbytes / best / 1e9


def write_csv(rows: Iterable[dict[str, object]], path: str | Path) -> Path:
    """Write ``rows`` (dicts with the keys of :data:`FIELDS`) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in FIELDS})
    tmp.replace(path)
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))
