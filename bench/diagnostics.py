"""Per-step probes for slow GRPO steps: GC pauses, recompiles, graph captures, allocator and host CPU.

``StepProbe.begin()`` / ``.end()`` bracket one step (outside its timed region) and return what moved in it:

* ``gc``: Python cyclic-GC passes and their pause time per generation (``gc.callbacks``);
* ``dynamo``: ``torch._dynamo.utils.counters`` deltas (frames compiled, graphs, FX-graph cache hits/misses,
  graph breaks) and the recompile messages logged in the step (``torch._logging``'s ``recompiles``);
* ``sampler``: the fast sampler's counter deltas (captures, compiles, compactions, fallbacks);
* ``cuda``: allocator deltas (cudaMalloc/cudaFree calls, alloc retries, segments) and reserved bytes;
* ``triton``: Triton JIT compilations in the step: count, seconds and kernel names (``JITFunction._do_compile``
  wrapped, which every ``@triton.jit`` kernel launched with new specialisations goes through: the decode
  attention kernel, TRL's chunked log-prob kernel), and new entries in Triton's on-disk cache;
* ``host``: this process's CPU time and involuntary context switches, its page faults (major ones read a page
  from disk: a cold page cache of the CUDA libraries, whose kernels load lazily on first launch) and the bytes it
  read from storage, its live child processes (inductor's compile workers) and their CPU time, and the machine's
  busy CPU share (``/proc``; psutil not needed);
* ``stacks``: where the main thread was: a thread samples its Python stack every ``StackSampler.INTERVAL``
  seconds; the step's most frequent stacks and the share of samples taken (a C call that holds the GIL, such as a
  kernel launch or a lazy module load, blocks the sampler: a low share says the thread was inside one).

``explain(step, typical)`` names the counters of a step that differ from a typical step's.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CUDA_KEYS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms", "num_sync_all_streams")


# ------------------------------------------------------------------------------------------ Triton JIT compiles
class TritonCompiles:
    """Counts and times Triton JIT compilations: wraps ``triton.runtime.jit.JITFunction._do_compile`` (a class
    method, so it sees every kernel, made before or after). ``installed`` is False where Triton or the method is
    missing (the CPU, another Triton): the probe then reports only the cache directory's entry count."""

    def __init__(self, jit_class=None):
        self.count, self.seconds, self.names = 0, 0.0, []
        self.installed = False
        self._cls = jit_class
        if self._cls is None:
            try:
                from triton.runtime.jit import JITFunction

                self._cls = JITFunction
            except Exception:  # noqa: BLE001 - no Triton
                return
        original = getattr(self._cls, "_do_compile", None)
        if original is None:
            return
        probe = self

        def timed(jit_self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(jit_self, *args, **kwargs)
            finally:
                probe.count += 1
                probe.seconds += time.perf_counter() - t0
                probe.names.append(
                    getattr(jit_self, "__name__", None) or getattr(getattr(jit_self, "fn", None), "__name__", "?")
                )

        self._original = original
        self._cls._do_compile = timed
        self.installed = True

    def close(self) -> None:
        if self.installed:
            self._cls._do_compile = self._original
            self.installed = False

    def snapshot(self) -> dict:
        return {
            "count": self.count,
            "seconds": self.seconds,
            "names": len(self.names),
            "cache_entries": cache_entries(),
        }

    def delta(self, before: dict, after: dict) -> dict:
        return {
            "compiles": after["count"] - before["count"],
            "compile_s": round(after["seconds"] - before["seconds"], 3),
            "kernels": sorted(set(self.names[before["names"] : after["names"]])),
            "new_cache_entries": after["cache_entries"] - before["cache_entries"],
            "hooked": self.installed,
        }


def cache_entries(root: str | None = None) -> int:
    """Entries in Triton's on-disk kernel cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``): one per
    compiled kernel specialisation (a compile that missed the cache adds one)."""
    root = root or os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        return len(os.listdir(root))
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------ /proc readers
def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may hold spaces


def process_tree(root: int | None = None) -> dict[int, float]:
    """Live descendants of ``root`` (default: this process) and their CPU seconds (user + system)."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None or fields[0] == "Z":
            continue
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = cpu[pid]
        todo.extend(children.get(pid, []))
    return out


def self_cpu() -> dict[str, float]:
    """This process's CPU seconds, context switches and page faults (all threads), and its storage reads
    (``read_bytes``: what it made the kernel fetch from disk; ``rchar``: every byte read, page cache too)."""
    fields = _stat_fields("self")
    out = {"cpu_s": (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields else time.process_time()}
    if fields:
        out["minflt"], out["majflt"] = float(fields[7]), float(fields[9])
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            key, value = line.split(":")
            if key in ("read_bytes", "rchar"):
                out[key] = float(value)
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches", "Threads")):
                key, value = line.split(":")
                out[key] = float(value)
    except OSError:
        pass
    return out


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU ticks of the whole machine since boot (``/proc/stat``), None where unreadable."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in first]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return sum(ticks) - idle, sum(ticks)


# ------------------------------------------------------------------------------------------ host stacks
class StackSampler:
    """Samples the main thread's Python stack from a daemon thread every ``INTERVAL`` seconds.

    ``take()`` returns the samples since the last call as ``{"samples", "expected", "top"}``: ``expected`` is
    the number of intervals that passed (fewer samples: the thread held the GIL in a long C call), ``top`` the
    ``TOP`` most frequent stacks (``DEPTH`` innermost frames, ``file:function:line`` joined by ``<``) with their
    share of the samples.
    """

    INTERVAL = 0.005
    DEPTH = 8
    TOP = 4

    def __init__(self, thread_id: int | None = None):
        import collections
        import threading

        self._target = thread_id if thread_id is not None else threading.main_thread().ident
        self._counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._since = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()

    @classmethod
    def stack_key(cls, frame) -> str:
        parts = []
        while frame is not None and len(parts) < cls.DEPTH:
            code = frame.f_code
            parts.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        return " < ".join(parts)

    def _run(self) -> None:
        import sys

        while not self._stop.wait(self.INTERVAL):
            with self._lock:  # a sample counts in the window it was taken in: take() waits for it
                frame = sys._current_frames().get(self._target)
                if frame is not None:
                    self._counts[self.stack_key(frame)] += 1

    def take(self) -> dict:
        now = time.perf_counter()
        with self._lock:
            counts, self._counts = self._counts, type(self._counts)()
        expected, self._since = (now - self._since) / self.INTERVAL, now
        samples = sum(counts.values())
        top = [{"share": round(n / samples, 3), "stack": key} for key, n in counts.most_common(self.TOP)]
        return {"samples": samples, "expected": int(expected), "top": top}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


# ------------------------------------------------------------------------------------------ the probe
class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage()[:400])


class StepProbe:
    """Bracket each step with ``begin()`` and ``end()``; ``end`` returns the step's counters (a dict)."""

    def __init__(
        self,
        sampler_getter=None,
        log_recompiles: bool = True,
        triton: TritonCompiles | None = None,
        stacks: bool = True,
    ):
        self.sampler_getter = sampler_getter or (lambda: None)
        self.stacks = StackSampler() if stacks else None
        self.triton = triton if triton is not None else TritonCompiles()
        self.gc_events: list[tuple[int, float]] = []  # (generation, pause s) within the current step
        self._gc_start: float | None = None
        gc.callbacks.append(self._on_gc)
        self.records = _Records()
        if log_recompiles:
            self._hook_recompile_log()
        self._before: dict = {}
        self.run_peak_bytes = 0  # max_memory_allocated over every probed step (the probe resets the peak)
        self.run_peak_reserved_bytes = 0

    def close(self) -> None:
        """Detach the GC callback (and the log handler)."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self.triton.close()
        if self.stacks is not None:
            self.stacks.close()
        for name in list(logging.root.manager.loggerDict):
            if name.endswith(("__recompiles", "__graph_breaks")):
                logging.getLogger(name).removeHandler(self.records)

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self.gc_events.append((info["generation"], time.perf_counter() - self._gc_start))
            self._gc_start = None

    def _hook_recompile_log(self) -> None:
        try:
            import torch as th
            import torch._dynamo.convert_frame  # noqa: F401  (creates the artifact loggers)
            import torch._dynamo.guards  # noqa: F401

            th._logging.set_logs(recompiles=True, graph_breaks=True)
        except Exception:  # noqa: BLE001 - a torch without these loggers: counters only
            return
        for name in list(logging.root.manager.loggerDict):
            if name.endswith(("__recompiles", "__graph_breaks")):
                logging.getLogger(name).addHandler(self.records)

    def _snapshot(self) -> dict:
        from bench.workload import sampler_stats

        snap: dict = {"t": time.perf_counter(), "self": self_cpu(), "machine": machine_cpu()}
        snap["children"] = process_tree()
        snap["triton"] = self.triton.snapshot()
        try:
            from torch._dynamo.utils import counters

            snap["dynamo"] = {f"{group}.{k}": v for group, c in counters.items() for k, v in c.items()}
        except Exception:  # noqa: BLE001
            snap["dynamo"] = {}
        snap["sampler"] = sampler_stats(self.sampler_getter())
        try:
            import torch as th

            if th.cuda.is_available() and th.cuda.is_initialized():
                stats = th.cuda.memory_stats()
                snap["cuda"] = {k: stats.get(k, 0) for k in CUDA_KEYS}
                snap["cuda"]["segments"] = stats.get("segment.all.current", 0)
                snap["cuda"]["reserved_bytes"] = stats.get("reserved_bytes.all.current", 0)
                peak, peak_reserved = th.cuda.max_memory_allocated(), th.cuda.max_memory_reserved()
                snap["peak_bytes"] = peak  # since the previous snapshot
                self.run_peak_bytes = max(self.run_peak_bytes, peak)
                self.run_peak_reserved_bytes = max(self.run_peak_reserved_bytes, peak_reserved)
                th.cuda.reset_peak_memory_stats()
        except Exception:  # noqa: BLE001
            pass
        return snap

    def begin(self) -> None:
        """Snapshot the counters at the start of a step (call before its timer starts)."""
        self.gc_events.clear()
        self.records.lines.clear()
        self._before = self._snapshot()
        if self.stacks is not None:
            self.stacks.take()  # drop what was sampled between steps

    def end(self) -> dict:
        """The step's deltas (call after its timer stopped)."""
        from bench.workload import stats_delta

        b, a = self._before, self._snapshot()
        if not b:
            return {}
        pauses: dict[str, float] = {}
        counts: dict[str, int] = {}
        for generation, pause in self.gc_events:
            pauses[str(generation)] = pauses.get(str(generation), 0.0) + pause
            counts[str(generation)] = counts.get(str(generation), 0) + 1
        wall = a["t"] - b["t"]
        children_cpu = sum(a["children"].get(pid, 0.0) - b["children"].get(pid, 0.0) for pid in a["children"])
        host = {
            "self_cpu_s": a["self"]["cpu_s"] - b["self"]["cpu_s"],
            "involuntary_ctx": a["self"].get("nonvoluntary_ctxt_switches", 0)
            - b["self"].get("nonvoluntary_ctxt_switches", 0),
            "threads": a["self"].get("Threads", 0),
            "children": len(a["children"]),
            "children_cpu_s": round(children_cpu, 3),
        }
        for key in ("majflt", "minflt", "read_bytes", "rchar"):
            if key in a["self"] and key in b["self"]:
                host[key] = a["self"][key] - b["self"][key]
        if a["machine"] and b["machine"] and a["machine"][1] > b["machine"][1]:
            host["machine_busy"] = round((a["machine"][0] - b["machine"][0]) / (a["machine"][1] - b["machine"][1]), 3)
        out = {
            "gc": {
                "pause_s": {k: round(v, 4) for k, v in pauses.items()},
                "passes": counts,
                "max_pause_s": round(max((p for _, p in self.gc_events), default=0.0), 4),
            },
            "dynamo": stats_delta(b["dynamo"], a["dynamo"]),
            "recompile_log": list(self.records.lines[:5]),
            "sampler": stats_delta(b["sampler"], a["sampler"]),
            "triton": self.triton.delta(b["triton"], a["triton"]),
            "host": host,
            "probe_wall_s": round(wall, 3),
            "t_end_epoch": round(time.time(), 3),  # to line the step up with an outside log (nvidia-smi)
        }
        if self.stacks is not None:
            out["stacks"] = self.stacks.take()
        if "cuda" in a and "cuda" in b:
            cuda = stats_delta(b["cuda"], a["cuda"])
            cuda["reserved_gib"] = round(a["cuda"]["reserved_bytes"] / 2**30, 2)
            cuda["segments_now"] = a["cuda"]["segments"]
            cuda["peak_allocated_gib"] = round(a.get("peak_bytes", 0) / 2**30, 2)
            out["cuda"] = cuda
        return out


# ------------------------------------------------------------------------------------------ reading them
SIGNALS = {  # counter -> (how to read it from a step record, threshold above the typical step, label)
    "gc2": (lambda d: d.get("gc", {}).get("pause_s", {}).get("2", 0.0), 0.05, "gen-2 GC {:.2f} s"),
    "gc_all": (lambda d: sum(d.get("gc", {}).get("pause_s", {}).values()), 0.1, "GC {:.2f} s"),
    "children_cpu": (lambda d: d.get("host", {}).get("children_cpu_s", 0.0), 1.0, "child CPU {:.1f} s"),
    "children": (lambda d: d.get("host", {}).get("children", 0), 0.5, "{:.0f} child procs"),
    "machine_busy": (lambda d: d.get("host", {}).get("machine_busy", 0.0), 0.15, "machine busy {:.0%}"),
    "ctx": (lambda d: d.get("host", {}).get("involuntary_ctx", 0), 200, "{:.0f} involuntary ctx switches"),
    "majflt": (lambda d: d.get("host", {}).get("majflt", 0), 50, "{:.0f} major page faults"),
    "disk": (lambda d: d.get("host", {}).get("read_bytes", 0) / 2**20, 16, "{:.0f} MiB read from disk"),
    "gil": (
        lambda d: 1 - d["stacks"]["samples"] / d["stacks"]["expected"] if d.get("stacks", {}).get("expected") else 0,
        0.25,
        "sampler starved {:.0%} (a long C call holding the GIL)",
    ),
    "frames": (lambda d: d.get("dynamo", {}).get("frames.total", 0), 0.5, "{:.0f} frames compiled"),
    "recompiles": (lambda d: len(d.get("recompile_log", [])), 0.5, "{:.0f} recompile msgs"),
    "captures": (lambda d: d.get("sampler", {}).get("captures", 0), 0.5, "{:.0f} graph captures"),
    "compiles": (lambda d: d.get("sampler", {}).get("compiles", 0), 0.5, "{:.0f} sampler compiles"),
    "triton": (lambda d: d.get("triton", {}).get("compiles", 0), 0.5, "{:.0f} Triton compiles"),
    "triton_s": (lambda d: d.get("triton", {}).get("compile_s", 0.0), 0.2, "Triton compiles {:.1f} s"),
    "mallocs": (lambda d: d.get("cuda", {}).get("num_device_alloc", 0), 0.5, "{:.0f} cudaMalloc"),
    "frees": (lambda d: d.get("cuda", {}).get("num_device_free", 0), 0.5, "{:.0f} cudaFree"),
    "retries": (lambda d: d.get("cuda", {}).get("num_alloc_retries", 0), 0.5, "{:.0f} alloc retries"),
}


def explain(step: dict, typical: list[dict]) -> list[str]:
    """Counters of ``step`` above those of the typical steps by more than each signal's threshold.

    Example:
        >>> slow = {"gc": {"pause_s": {"2": 1.2}}, "host": {"children_cpu_s": 0.1}}
        >>> fast = {"gc": {"pause_s": {}}, "host": {"children_cpu_s": 0.2}}
        >>> explain(slow, [fast, fast])
        ['gen-2 GC 1.20 s', 'GC 1.20 s']
    """
    from bench.workload import median

    out = []
    for read, threshold, label in SIGNALS.values():
        value = read(step)
        base = median([read(t) for t in typical]) or 0.0
        if value - base > threshold:
            out.append(label.format(value))
    return out


# ------------------------------------------------------------------------------------------ a profiled call
def profile_call(fn, sync, cuda: bool, steps: int, top: int = 30) -> dict:
    """Run ``fn`` once under ``torch.profiler``: its wall time, the time the device was busy (the sum of kernel
    times: with CUDA graphs the replayed kernels are seen too), the kernels launched per decode step, and the
    ``top`` kernels by total time (name, calls, total ms, us per decode step). On the CPU (no CUDA) the table is
    of CPU ops, as a smoke test of the wiring. ``wall - busy`` is what launches and the host cost a step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync()
    wall = time.perf_counter() - t0
    key = "self_device_time_total" if cuda else "self_cpu_time_total"  # on CUDA: the kernels' own rows
    events = sorted((e for e in prof.key_averages() if getattr(e, key, 0) > 0), key=lambda e: -getattr(e, key))
    busy_us = sum(getattr(e, key) for e in events)
    launches = sum(e.count for e in events)
    return {
        "wall_s": round(wall, 4),
        "busy_s": round(busy_us / 1e6, 4),
        "busy_share": round(busy_us / 1e6 / wall, 3) if wall else None,
        "launches_per_step": round(launches / max(steps, 1), 1),
        "top": [
            {
                "name": e.key[:120],
                "calls": e.count,
                "total_ms": round(getattr(e, key, 0) / 1e3, 3),
                "us_per_step": round(getattr(e, key, 0) / max(steps, 1), 2),
            }
            for e in events[:top]
        ],
    }
