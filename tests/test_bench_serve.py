"""`paged-backend bench serve` end to end on the CPU: it starts our server and `transformers serve`
on a tiny random model, drives both at two concurrency levels with streamed chat requests, and its
numbers must be consistent (every request exactly its output length, ordered percentiles, goodput
within the completed requests). Speed is not checked."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from paged_backend.bench.serve import exact_length_prompts
from paged_backend.bench.serve_client import RequestResult, summarize
from paged_backend.cli import main


def test_exact_length_prompts_reencode_to_their_length(smollm_tokenizer):
    texts = exact_length_prompts(smollm_tokenizer, 5, 64, seed=3)
    assert len(set(texts)) == 5
    assert all(len(smollm_tokenizer.encode(t, add_special_tokens=False)) == 64 for t in texts)


def test_summarize_percentiles_and_goodput():
    rs = [RequestResult(ok=True, ttft=0.1 * i, e2e=0.1 * i + 0.9, output_tokens=10,
                        chunk_times=[0.1 * i + 0.1 * k for k in range(10)]) for i in range(1, 11)]
    rs.append(RequestResult(ok=False, error="HTTP 500: boom"))
    s = summarize(rs, duration=2.0, slo_ttft=0.5, slo_itl=0.2)
    assert s["completed"] == 10 and s["failed"] == 1 and s["errors"] == ["HTTP 500: boom"]
    assert s["output_tokens"] == 100 and s["output_tok_per_s"] == 50.0
    assert s["ttft_s"]["p50"] == pytest.approx(0.55) and s["itl_s"]["p99"] == pytest.approx(0.1)
    assert s["tpot_s"]["mean"] == pytest.approx(0.1) and s["goodput_req_per_s"] == 5 / 2.0  # TTFT <= 0.5: 5 of 10


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("bentoml") is None,
                    reason="needs pip install 'paged-backend[bench,bentoml]' (fastapi for transformers serve)")
def test_bench_serve_ours_and_transformers(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGED_BACKEND_TORCH_THREADS", "1")
    out, levels, n_per, out_len = tmp_path / "s.json", [1, 2], 2, 6
    assert main(["bench", "serve", "--model", str(tiny_model_dir("llama")), "--server", "both", "--device", "cpu",
                 "--dtype", "float32", "--concurrency", ",".join(map(str, levels)), "--prompts-per-client",
                 str(n_per), "--input-len", "24", "--output-len", str(out_len), "--warmup", "1", "--server-threads",
                 "1", "--json", str(out), "--workdir", str(tmp_path)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"ours", "transformers"} and set(data["versions"]) == {"ours", "transformers"}
    for server, rows in data["results"].items():
        assert [r["level"] for r in rows] == levels
        for r, c in zip(rows, levels):
            assert r["mode"] == "concurrency" and r["failed"] == 0, (server, r["errors"])
            assert r["completed"] == r["num_requests"] == n_per * c
            assert r["output_tokens"] == n_per * c * out_len and r["exact_output_len"], server
            assert r["output_tok_per_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])
            for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
                p = r[key]
                assert 0 <= p["p50"] <= p["p90"] <= p["p99"] and math.isfinite(p["p99"]), (server, key, p)
            assert 0 < r["ttft_s"]["p50"] < r["e2e_s"]["p50"]
            assert 0 <= r["goodput_req_per_s"] <= r["requests_per_s"]
    assert [c["level"] for c in data["comparison"]] == levels
