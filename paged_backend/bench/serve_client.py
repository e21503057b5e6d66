"""The load generator of `bench serve`: streamed OpenAI requests at a Poisson rate or a fixed
concurrency, timed per token chunk on the client, and the per-level summary.

Definitions (as vLLM's serving benchmark uses them): TTFT = first content chunk - request sent;
ITL = gaps between successive content chunks, pooled over all requests; TPOT = (E2E - TTFT) /
(output tokens - 1) per request; goodput = requests/s of those meeting TTFT <= slo_ttft and
TPOT <= slo_itl. Output tokens are the server's `usage.completion_tokens` (streamed with the last
chunk), else the streamed text re-tokenized.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # seconds since the request was sent

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def _chunk_text(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def stream_one(client, url: str, body: dict, tokenizer) -> RequestResult:
    """One streamed request; never raises for a server or connection error (it is counted)."""
    start = time.perf_counter()
    times, pieces, usage = [], [], None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode("utf-8", "replace")[:300]
                return RequestResult(ok=False, error=f"HTTP {resp.status_code}: {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(ok=False, error=str(chunk["error"])[:300])
                text = _chunk_text(chunk)
                if text:
                    times.append(time.perf_counter() - start)
                    pieces.append(text)
                usage = chunk.get("usage") or usage
    except Exception as e:  # a dropped connection fails this request only
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter() - start
    if not times:
        return RequestResult(ok=False, error="no content streamed")
    n = usage["completion_tokens"] if usage else len(tokenizer.encode("".join(pieces), add_special_tokens=False))
    return RequestResult(ok=True, ttft=times[0], e2e=end, output_tokens=n, chunk_times=times)


async def run_level(base_url: str, endpoint: str, bodies: list[dict], rate: float, concurrency: int | None,
                    tokenizer, seed: int, label: str) -> tuple[list[RequestResult], float]:
    """Sends `bodies` with exponential gaps of mean 1/rate (rate inf: all at once), at most
    `concurrency` in flight; returns the results in order and the level's wall time."""
    import httpx

    url = f"{base_url.rstrip('/')}/v1/{endpoint}"
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(total=len(bodies), desc=label, unit="req", leave=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0), limits=limits) as client:

        async def send(body: dict) -> RequestResult:
            if sem is None:
                result = await stream_one(client, url, body, tokenizer)
            else:
                async with sem:
                    result = await stream_one(client, url, body, tokenizer)
            bar.update(1)
            return result

        t0 = time.perf_counter()
        tasks = []
        for i, body in enumerate(bodies):
            tasks.append(asyncio.create_task(send(body)))
            if not math.isinf(rate) and i + 1 < len(bodies):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration


def _pcts(values: list[float]) -> dict:
    if not values:
        return dict(mean=0.0, p50=0.0, p90=0.0, p99=0.0)
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return dict(mean=float(a.mean()), p50=float(p50), p90=float(p90), p99=float(p99))


def summarize(results: list[RequestResult], duration: float, slo_ttft: float, slo_itl: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    good = [r for r in ok if r.ttft <= slo_ttft and r.tpot <= slo_itl]
    errors = sorted({r.error for r in results if not r.ok})
    return dict(
        num_requests=len(results), completed=len(ok), failed=len(results) - len(ok), errors=errors[:5],
        duration_s=duration, output_tokens=out_tokens, requests_per_s=len(ok) / duration,
        output_tok_per_s=out_tokens / duration, ttft_s=_pcts([r.ttft for r in ok]), itl_s=_pcts(itl),
        tpot_s=_pcts([r.tpot for r in ok]), e2e_s=_pcts([r.e2e for r in ok]),
        goodput_req_per_s=len(good) / duration, slo_met_fraction=len(good) / len(results) if results else 0.0,
        output_tokens_per_request=sorted({r.output_tokens for r in ok}),
    )
