"""Per-step timing of the runtime on every rank, for finding where a step's time goes. Off by default.

    PAGED_BACKEND_PROFILE_STEPS=1 python -m paged_backend.cli bench throughput ...

With the variable set (spawned tensor-parallel workers inherit it), each process that runs a model
shard (tp=1: the engine's process; tp>1: rank 0 and every worker) records, per step:
- host phases, in seconds of wall time: `send` (rank 0: the step handed to the workers), `wait`
  (a worker: blocked until the next step arrives), `recv` (a worker: reading and decoding it),
  `inputs` (step arrays to the device, pending tokens filled in), `forward` (the graph replay or the
  eager forward pass launched), `logits` (LM head and, under tp, the gather to rank 0), `sample`
  (rank 0), `result` (rank 0: the engine waiting in `resolve()` for the sampled ids: the host
  waiting for the GPU), `outside` (between the end of one step's runtime call and the start of the
  next: on rank 0 the engine's scheduling and post-processing), `period` (start to start);
- on CUDA, the same phases on the GPU (CUDA events recorded at the phase boundaries, read only at
  the end, so the host never waits for them), and `idle`: how long the GPU sat idle between the
  previous step's last event and this step's first (the host was late).
On the GPU a phase that ends in a collective includes waiting for the slowest rank.

When the runner is released (engine shutdown), each process prints the medians per kind of step
(decode at the largest batch seen, all decode steps, steps with prompt tokens) to stderr, one
block per rank. Off, the runtime holds `None` instead of a profile: nothing is recorded or timed.
"""

from __future__ import annotations

import os
import statistics
from collections import deque
import sys
import time

import torch

ENV = "PAGED_BACKEND_PROFILE_STEPS"
_KEEP = 20_000  # steps (a server left running with profiling on keeps its latest ones only)
HOST_PHASES = ("send", "wait", "recv", "inputs", "forward", "logits", "sample", "result", "outside", "period")
GPU_PHASES = ("idle", "inputs", "forward", "logits", "sample")


def from_env(label: str, device: torch.device) -> "StepProfile | None":
    return StepProfile(label, device) if os.environ.get(ENV, "") not in ("", "0") else None


class _Step:
    __slots__ = ("kind", "batch", "opened", "last", "closed", "host", "events")

    def __init__(self, opened: float):
        self.kind, self.batch = "", 0
        self.opened = self.last = opened
        self.closed = 0.0
        self.host: dict[str, float] = {}
        self.events: list[tuple[str, torch.cuda.Event]] = []


class StepProfile:
    def __init__(self, label: str, device: torch.device):
        self.label = label
        self._cuda = device.type == "cuda"
        self._steps: deque[_Step] = deque(maxlen=_KEEP)
        self._open: _Step | None = None

    def add(self, name: str, seconds: float) -> None:
        """A host phase measured by the caller before the runner starts the step (send, wait, recv)."""
        if self._open is None:
            self._open = _Step(time.perf_counter() - seconds)
        self._open.host[name] = self._open.host.get(name, 0.0) + seconds
        self._open.last = time.perf_counter()

    def begin(self, step) -> None:
        if self._open is None:
            self._open = _Step(time.perf_counter())
        rec = self._open
        rec.kind = "decode" if step.max_query_len == 1 else "prefill"
        rec.batch = step.num_seqs
        rec.last = time.perf_counter()
        self._event("begin")

    def mark(self, name: str) -> None:
        """The phase `name` ends now (host and GPU)."""
        rec = self._open
        now = time.perf_counter()
        rec.host[name] = now - rec.last
        rec.last = now
        self._event(name)

    def end(self, sampled):
        """Close the step; returns `sampled` (rank 0's samples), wrapped so that the engine's wait for
        them is recorded as `result`."""
        rec, self._open = self._open, None
        rec.closed = time.perf_counter()
        self._steps.append(rec)
        return None if sampled is None else _TimedSamples(sampled, rec)

    def _event(self, name: str) -> None:
        if self._cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._open.events.append((name, e))

    # ---- the report --------------------------------------------------------------------------
    def report(self) -> None:
        """Print the medians (if any step ran) and start over."""
        if self._steps:
            print("\n".join(self.summary_lines()), file=sys.stderr, flush=True)
        self._steps.clear()
        self._open = None

    def summary_lines(self) -> list[str]:
        steps = list(self._steps)
        if self._cuda:
            torch.cuda.synchronize()
        rows = [_phases(prev, rec, self._cuda) for prev, rec in zip([None] + steps[:-1], steps)]
        decode = [(rec, r) for rec, r in zip(steps, rows) if rec.kind == "decode"]
        full = max((rec.batch for rec, _ in decode), default=0)
        groups = [
            (f"decode at batch {full}", [r for rec, r in decode if rec.batch == full]),
            ("decode (all)", [r for _, r in decode]),
            ("prefill/mixed", [r for rec, r in zip(steps, rows) if rec.kind == "prefill"]),
        ]
        lines = [f"[step profile {self.label}] {len(steps)} steps; medians in ms"]
        for title, group in groups:
            if not group:
                continue
            host = "  ".join(f"{k} {_median(group, 'host', k)}" for k in HOST_PHASES if _has(group, "host", k))
            lines.append(f"[step profile {self.label}] {title}: {len(group)} steps | host: {host}")
            if self._cuda:
                gpu = "  ".join(f"{k} {_median(group, 'gpu', k)}" for k in GPU_PHASES if _has(group, "gpu", k))
                lines.append(f"[step profile {self.label}] {title}: gpu: {gpu}")
        return lines


class _TimedSamples:
    """SampledTokens whose `resolve()` records how long the caller waited."""

    def __init__(self, inner, rec: _Step):
        self._inner, self._rec = inner, rec

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def resolve(self):
        t0 = time.perf_counter()
        out = self._inner.resolve()
        self._rec.host["result"] = self._rec.host.get("result", 0.0) + time.perf_counter() - t0
        return out


def _phases(prev: _Step | None, rec: _Step, cuda: bool) -> dict[str, dict[str, float]]:
    host = dict(rec.host)
    if prev is not None:
        host["outside"] = rec.opened - prev.closed
        host["period"] = rec.opened - prev.opened
    gpu: dict[str, float] = {}
    if cuda and rec.events:
        for (_, a), (name, b) in zip(rec.events, rec.events[1:]):
            gpu[name] = a.elapsed_time(b) / 1e3
        if prev is not None and prev.events:
            gpu["idle"] = max(0.0, prev.events[-1][1].elapsed_time(rec.events[0][1]) / 1e3)
    return {"host": host, "gpu": gpu}


def _has(group: list[dict], side: str, key: str) -> bool:
    return any(key in r[side] for r in group)


def _median(group: list[dict], side: str, key: str) -> str:
    return f"{statistics.median(r[side][key] for r in group if key in r[side]) * 1e3:.3f}"
