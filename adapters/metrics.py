"""The engine's Prometheus metrics, named like vLLM's (`vllm:x` -> `paged_backend:x`) so that existing
dashboards adapt by a rename. Under `bentoml serve` they are written to BentoML's multiprocess
directory, so BentoML's own `/metrics` shows them beside its HTTP counters (one endpoint).

Gauges and counters are read from the engine's public stats (`AsyncLLM.stats()`) when /metrics is
scraped; histograms are observed from `RequestOutput.metrics` of each finished request.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Optional

from paged_backend import AsyncLLM, EngineStats, RequestOutput

PREFIX = "paged_backend:"
# vLLM's bucket edges (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)

# stats field -> counter name (without the _total prometheus_client appends)
_COUNTERS = {
    "total_prompt_tokens": ("prompt_tokens", "Prompt tokens processed."),
    "total_generated_tokens": ("generation_tokens", "Tokens generated."),
    "num_preemptions": ("num_preemptions", "Requests preempted (KV blocks reclaimed, recomputed later)."),
    "prefix_cache_hit_tokens": ("prefix_cache_hits", "Prompt tokens served from the prefix cache."),
}


@functools.lru_cache(maxsize=None)
def _instruments() -> dict[str, Any]:
    """Created once per process, on first use: prometheus_client must be imported after BentoML's
    worker has set PROMETHEUS_MULTIPROC_DIR, and a name can only be registered once."""
    from prometheus_client import Counter, Gauge, Histogram

    label = ["model_name"]

    def gauge(name: str, doc: str, mode: str = "livesum") -> Any:
        return Gauge(PREFIX + name, doc, label, multiprocess_mode=mode)

    made: dict[str, Any] = {
        "num_requests_running": gauge("num_requests_running", "Requests in the running batch."),
        "num_requests_waiting": gauge("num_requests_waiting", "Requests waiting to be scheduled."),
        "num_kv_blocks_used": gauge("num_kv_blocks_used", "KV-cache blocks in use."),
        "num_kv_blocks_total": gauge("num_kv_blocks_total", "KV-cache blocks in all."),
        "kv_cache_usage_perc": gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", "livemax"),
        "prefix_cache_hit_rate": gauge("prefix_cache_hit_rate", "Prefix-cache hit rate since start (0-1).",
                                       "livemax"),
        "request_success": Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                   label + ["finished_reason"]),
        "time_to_first_token_seconds": Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                                                 label, buckets=_TTFT_BUCKETS),
        "inter_token_latency_seconds": Histogram(PREFIX + "inter_token_latency_seconds",
                                                 "Time between consecutive output tokens.", label,
                                                 buckets=_ITL_BUCKETS),
        "e2e_request_latency_seconds": Histogram(PREFIX + "e2e_request_latency_seconds",
                                                 "Arrival to finish of a request.", label, buckets=_E2E_BUCKETS),
    }
    for field, (name, doc) in _COUNTERS.items():
        made[field] = Counter(PREFIX + name, doc, label)
    return made


class EngineMetrics:
    """One per engine (per BentoML worker)."""

    def __init__(self, llm: AsyncLLM, model_name: str):
        self.llm = llm
        self.model_name = model_name
        self._m = {k: v.labels(model_name) for k, v in _instruments().items() if k != "request_success"}
        self._success = _instruments()["request_success"]
        self._last: dict[str, int] = {field: 0 for field in _COUNTERS}
        self._lock = threading.Lock()  # scrapes may overlap; counter deltas must not be counted twice

    def refresh(self) -> EngineStats:
        """Reads the engine's stats into the gauges and counters (call off the event loop: it takes
        the engine's lock)."""
        st = self.llm.stats()
        with self._lock:
            m = self._m
            m["num_requests_running"].set(st.num_running)
            m["num_requests_waiting"].set(st.num_waiting)
            m["num_kv_blocks_used"].set(st.num_blocks_used)
            m["num_kv_blocks_total"].set(st.num_blocks_total)
            m["kv_cache_usage_perc"].set(st.num_blocks_used / st.num_blocks_total if st.num_blocks_total else 0.0)
            m["prefix_cache_hit_rate"].set(st.prefix_cache_hit_rate)
            for field in _COUNTERS:
                value = getattr(st, field)
                if value > self._last[field]:
                    m[field].inc(value - self._last[field])
                self._last[field] = value
        return st

    def observe(self, out: RequestOutput) -> None:
        """Records a finished request's latencies (from the engine's own timestamps)."""
        if not out.finished:
            return
        met = out.metrics
        m = self._m
        ttft: Optional[float] = met.time_to_first_token
        if ttft is not None:
            m["time_to_first_token_seconds"].observe(ttft)
        for gap in met.inter_token_latencies:
            m["inter_token_latency_seconds"].observe(gap)
        if met.finished_time is not None:
            m["e2e_request_latency_seconds"].observe(met.finished_time - met.arrival_time)
        for c in out.outputs:
            self._success.labels(self.model_name, c.finish_reason or "abort").inc()
