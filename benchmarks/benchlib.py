"""What every benchmark here shares: the record of the machine and the run, timing, memory probes, Markdown.

A benchmark script imports it as ``benchlib`` (``benchmarks/`` is on ``sys.path`` when a script there runs) and keeps
to itself only what it measures. Each report names the command, the machine, the load and the code version, and
gives its figures as ratios against a baseline measured in the same run.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 1024 * 1024

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    initializer_range=0.041666666666666664,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
)
"""SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), for randomly initialised models."""


# ------------------------------------------------------------------------------------------ the record
def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo, with family/model/stepping and the wide-vector flags."""
    try:
        info: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (x.strip() for x in line.split(":", 1))
                info.setdefault(key, value)
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in info.get("flags", "").split()]
        return (
            f"{info.get('model name', 'unknown')} (family {info.get('cpu family')}, model {info.get('model')}, "
            f"stepping {info.get('stepping')}; {', '.join(flags) or 'no AVX2'})"
        )
    except OSError:
        return platform.processor() or "unknown"


def mem_total() -> str:
    try:
        kib = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1])
        return fmt_bytes(kib * 1024)
    except (OSError, StopIteration):
        return "unknown"


def machine() -> str:
    """``N x <cpu>, <RAM> RAM, <OS>, Python <version>``."""
    return (f"{os.cpu_count()} x {cpu_model()}, {mem_total()} RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def load_average() -> str:
    """The 1 / 5 / 15 minute load averages, ``a/b/c``."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def command_line(script: str) -> str:
    """How this run was started, from the repository root: ``python benchmarks/x.py <args>``."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script, REPO), *sys.argv[1:]])


def git_state() -> str:
    """The short commit, and whether ``asft_lightning/`` has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "asft_lightning"], cwd=REPO, capture_output=True,
                               text=True).stdout
        return head.strip() + (" (asft_lightning/ has uncommitted changes)" if dirty.strip() else " (clean)")
    except OSError:
        return "unknown"


def busy_processes(limit: int = 5) -> list[str]:
    """Top CPU consumers other than this benchmark (``ps``), for the record."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return []
    mine = {os.getpid(), os.getppid()}
    rows = []
    for line in out[1:]:
        parts = line.split(None, 3)
        if len(parts) == 4 and int(parts[0]) not in mine and float(parts[1]) >= 5.0:
            rows.append(f"pid {parts[0]} {parts[3]} {parts[1]}% CPU (up {parts[2]})")
    return rows[:limit]


class OtherLoad(threading.Thread):
    """Samples, every ``interval`` s, the CPU used by processes outside this benchmark (in cores), from /proc."""

    def __init__(self, interval: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[float] = []
        self.stop_event = threading.Event()
        self.hz = os.sysconf("SC_CLK_TCK")

    def _ticks(self) -> dict[int, int]:
        me = os.getpid()
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid = int(entry), int(fields[1])
            if pid == me or ppid == me:
                continue
            out[pid] = int(fields[11]) + int(fields[12])  # utime + stime
        return out

    def run(self) -> None:
        prev, t_prev = self._ticks(), time.monotonic()
        while not self.stop_event.wait(self.interval):
            cur, t = self._ticks(), time.monotonic()
            used = sum(v - prev.get(pid, v) for pid, v in cur.items() if v >= prev.get(pid, v))
            self.samples.append(used / self.hz / (t - t_prev))
            prev, t_prev = cur, t

    def summary(self) -> str:
        if not self.samples:
            return "no samples"
        busy = sum(x > 0.2 for x in self.samples)
        return (f"mean {statistics.fmean(self.samples):.2f} cores, max {max(self.samples):.2f} cores; "
                f"{busy} of {len(self.samples)} {self.interval:.0f}-s samples above 0.2 cores")


# ---------------------------------------------------------------------------------------------- timing
def median_time(fn: Callable[[], object], n: int = 7) -> float:
    """Median wall-clock seconds of ``n`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sampled_time(fn: Callable[[], object], reps: int, first: float, sample_s: float = 0.2) -> tuple[int, list[float]]:
    """``reps`` samples of ``fn``'s seconds per call, each the mean of enough calls (``inner``) to last about
    ``sample_s`` given that one call took ``first`` seconds; returns ``(inner, samples)``."""
    inner = max(1, math.ceil(sample_s / max(first, 1e-7)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return inner, samples


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every function once per repeat, in an order that rotates each repeat (cancelling position effects).

    Returns ``(wall, cpu)``: per name, the wall-clock and the process-CPU seconds of each timed call.
    """
    order = list(fns)
    for _ in range(warmup):
        for name in order:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in order}
    cpu: dict[str, list[float]] = {name: [] for name in order}
    for rep in range(reps):
        for name in order[rep % len(order):] + order[: rep % len(order)]:
            t, c = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return wall, cpu


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    """The process's resident high-water mark (``VmHWM``)."""
    return _status_kib("VmHWM") * 1024


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak() -> bool:
    """Reset the resident high-water mark to the current RSS (Linux >= 4.0); ``False`` if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakProbe:
    """Peak resident-memory increase over a region: ``with PeakProbe() as p: ...; p.peak_increase``."""

    def __enter__(self) -> PeakProbe:
        gc.collect()
        self.reset = reset_peak()
        self.start_rss = rss_bytes()
        self.start_hwm = hwm_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        base = self.start_rss if self.reset else self.start_hwm
        self.peak_increase = max(0, hwm_bytes() - base)


def tensor_bytes(*tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run_worker(script: str, args: list[str], threads: int) -> dict[str, Any]:
    """Run ``script --threads N --worker <args>`` in a fresh process; it prints one JSON object on its last line."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(script).resolve()), "--threads", str(threads), "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- reports
def fmt_bytes(n: float) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


def fmt_time(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table: the header, the rule, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def targets_table(targets: Iterable[tuple[str, str, str, bool]]) -> list[str]:
    """``| figure | target | measured | met |`` for ``(figure, target, measured, met)`` tuples."""
    return table(["figure", "target", "measured", "met"],
                 ((a, b, c, "yes" if ok else "**NO**") for a, b, c, ok in targets))


def write_report(text: str, path: str | os.PathLike | None) -> None:
    """Print the report and, when ``path`` is given, write it there atomically."""
    print(text)
    if path:
        from asft_lightning.fileio import atomic_write_text

        atomic_write_text(text, Path(path))
