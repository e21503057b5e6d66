"""`paged-backend bench serve`: streamed OpenAI requests against running services, per load level.

    # start ours and transformers' server one after the other on the same model and prompts
    paged-backend bench serve --model smollm2-135m-instruct --dtype float32 --device cpu --server both \\
        --concurrency 1,4,16 --input-len 256 --output-len 128 --json s.json --plot s.png
    paged-backend bench serve --model llama-3.2-1b --server both --request-rate 4,16,64,inf --num-prompts 256
    paged-backend bench serve --base-url http://127.0.0.1:3000 --model smollm2-135m-instruct --concurrency 4

Levels: Poisson arrivals at each --request-rate (inf: all at once), or a closed --concurrency (at
most N in flight; N x --prompts-per-client requests unless --num-prompts). Every request gets its
own prompt of exactly --input-len tokens (random token ids decoded to text and re-encoded until the
length holds) or a line of --prompt-file, and makes exactly --output-len tokens: EOS is ignored
(ours and vLLM: `ignore_eos`; transformers serve: a per-request generation_config with
eos_token_id -1, its "no EOS"). Each level reports requests/s, output tok/s, TTFT, ITL, TPOT and
end-to-end latency at p50/p90/p99 and the goodput under the SLO; table, JSON and PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

from paged_backend.bench.serve_client import run_level, summarize
from paged_backend.bench.serve_servers import (SERVERS, ServerProcess, free_port, prepare_model_dir,
                                               server_command, server_version)


def _floats(text: str) -> list[float]:
    vals = [float(x) for x in text.split(",") if x]
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive numbers (or inf)")
    return vals


def _ints(text: str) -> list[int]:
    vals = [int(x) for x in text.split(",") if x]
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 1")
    return vals


def _servers(text: str) -> list[str]:
    names = list(SERVERS) if text == "both" else [x for x in text.split(",") if x]
    bad = [x for x in names if x not in SERVERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--server {text!r}: choose ours, transformers, both or a comma list")
    return names


def _len_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or MIN:MAX with 1 <= MIN <= MAX")
    return lo_i, hi_i


def exact_length_prompts(tokenizer, num: int, input_len: int | tuple[int, int], seed: int) -> list[str]:
    """Texts that re-encode to exactly their length in tokens (random ids, decoded, re-encoded,
    topped up until the length holds), lengths uniform in `input_len` (as workload A draws them);
    unique with overwhelming probability."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    lo, hi = (input_len, input_len) if isinstance(input_len, int) else input_len
    texts = []
    for _ in range(num):
        n = rng.randint(lo, hi)
        ids = [rng.choice(vocab) for _ in range(n)]
        for _ in range(20):
            ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:n]
            if len(ids) == n and len(tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)) == n:
                break
            ids += [rng.choice(vocab) for _ in range(n - len(ids))]
        else:
            raise ValueError(f"could not make a {n}-token prompt with this tokenizer; use --prompt-file")
        texts.append(tokenizer.decode(ids))
    return texts


def _levels(a) -> list[dict]:
    levels = [dict(mode="concurrency", value=c, rate=math.inf, concurrency=c,
                   num=a.num_prompts or a.prompts_per_client * c) for c in a.concurrency or []]
    levels += [dict(mode="rate", value=r, rate=r, concurrency=a.max_concurrency, num=a.num_prompts or 64)
               for r in a.request_rate or []]
    if not levels:
        raise ValueError("give --concurrency and/or --request-rate")
    return levels


def _body(a, model_id: str, text: str, kind: str, max_tokens: int) -> dict:
    body = dict(model=model_id, max_tokens=max_tokens, temperature=0.0, stream=True,
                stream_options={"include_usage": True})
    if a.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if kind == "transformers":  # its request schema refuses unknown fields such as ignore_eos
        body["generation_config"] = json.dumps(dict(max_new_tokens=max_tokens, eos_token_id=-1, do_sample=False))
    else:
        body["ignore_eos"] = True
    body.update(json.loads(a.extra_body) if a.extra_body else {})
    return body


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def _measure(a, kind: str, base_url: str, model_id: str, tokenizer, prompts: list[str], levels: list[dict]) -> list[dict]:
    endpoint = "chat/completions" if a.endpoint == "chat" else "completions"
    warm = [_body(a, model_id, p, kind, min(16, a.output_len)) for p in prompts[:a.warmup]]
    if warm:
        print(f"[bench serve] {kind}: warm-up, {len(warm)} requests", flush=True)
        res, _ = asyncio.run(run_level(base_url, endpoint, warm, math.inf, None, tokenizer, a.seed, "warm-up"))
        if not all(r.ok for r in res):
            raise RuntimeError(f"{kind}: warm-up requests failed: {sorted({r.error for r in res if not r.ok})}")
    out, pos = [], a.warmup
    for lv in levels:
        bodies = [_body(a, model_id, p, kind, a.output_len) for p in prompts[pos:pos + lv["num"]]]
        pos += lv["num"]
        load0 = _loadavg()
        label = f"{kind} {lv['mode']} {lv['value']:g}"
        res, duration = asyncio.run(run_level(base_url, endpoint, bodies, lv["rate"], lv["concurrency"], tokenizer,
                                              a.seed, label))
        s = summarize(res, duration, a.slo_ttft, a.slo_itl)
        s.update(mode=lv["mode"], level=lv["value"], max_concurrency=lv["concurrency"],
                 load_avg_1min=[load0, _loadavg()],
                 exact_output_len=s["output_tokens_per_request"] == [a.output_len])
        out.append(s)
        _print_level(kind, s)
        if not s["exact_output_len"]:
            print(f"[bench serve] WARNING {kind}: output lengths {s['output_tokens_per_request']} != "
                  f"{a.output_len}: the stopping rule differs", flush=True)
    return out


def _ms(p: dict) -> str:
    return f"{p['p50'] * 1e3:7.0f} {p['p90'] * 1e3:7.0f} {p['p99'] * 1e3:7.0f}"


def _hub_cache(workdir: Path) -> Path:
    """The hub cache the transformers peer scans for its model list: the user's if it exists, else an
    empty one in the work directory (machines without a model hub have none)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    home = Path(HF_HUB_CACHE)
    if home.is_dir():
        return home
    empty = workdir / "hf-hub-cache"
    empty.mkdir(parents=True, exist_ok=True)
    return empty


def _print_header() -> None:
    print(f"{'server':12s} {'level':>14s} {'req/s':>7s} {'out tok/s':>9s} | {'TTFT ms p50   p90     p99':>23s} | "
          f"{'ITL ms p50    p90     p99':>23s} | {'E2E s p50  p90   p99':>20s} | {'goodput':>7s} {'ok':>7s} {'load':>5s}",
          flush=True)


def _print_level(kind: str, s: dict) -> None:
    e = s["e2e_s"]
    lvl = f"{'c' if s['mode'] == 'concurrency' else 'rate'}={s['level']:g}"
    load = s["load_avg_1min"][1]
    print(f"{kind:12s} {lvl:>14s} {s['requests_per_s']:7.2f} {s['output_tok_per_s']:9.1f} | {_ms(s['ttft_s'])} | "
          f"{_ms(s['itl_s'])} | {e['p50']:6.2f} {e['p90']:6.2f} {e['p99']:6.2f} | {s['goodput_req_per_s']:7.2f} "
          f"{s['completed']:3d}/{s['num_requests']:<3d} {load if load is not None else float('nan'):5.1f}", flush=True)


def _compare(results: dict) -> list[dict]:
    if set(results) != set(SERVERS):
        return []
    rows = []
    for ours, peer in zip(results["ours"], results["transformers"]):
        rows.append(dict(mode=ours["mode"], level=ours["level"],
                         output_tok_per_s_ratio=ours["output_tok_per_s"] / max(peer["output_tok_per_s"], 1e-9),
                         goodput_ratio=(ours["goodput_req_per_s"] / peer["goodput_req_per_s"]
                                        if peer["goodput_req_per_s"] else None),
                         ttft_p50_s=[ours["ttft_s"]["p50"], peer["ttft_s"]["p50"]],
                         itl_p50_s=[ours["itl_s"]["p50"], peer["itl_s"]["p50"]]))
    return rows


def _saturation(levels: list[dict]) -> float | None:
    """The first offered rate the server no longer keeps up with (achieved < 90 % of offered)."""
    for s in levels:
        if s["mode"] == "rate" and not math.isinf(s["level"]) and s["requests_per_s"] < 0.9 * s["level"]:
            return s["level"]
    return None


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the `finally` that stops the servers


def serve(a) -> dict:
    from transformers import AutoTokenizer

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    levels = _levels(a)
    total = a.warmup + sum(lv["num"] for lv in levels)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model_dir = None if a.base_url else prepare_model_dir(a.model, a.dtype, a.device, workdir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir or a.tokenizer or a.model)
        if a.prompt_file:
            lines = [x for x in Path(a.prompt_file).read_text(encoding="utf-8").splitlines() if x.strip()]
            if not lines:
                raise ValueError(f"prompt file {a.prompt_file} has no prompts (one per line)")
            prompts = [lines[i % len(lines)] for i in range(total)]
        else:
            print(f"[bench serve] making {total} prompts of {a.input_len[0]}-{a.input_len[1]} tokens", flush=True)
            prompts = exact_length_prompts(tokenizer, total, a.input_len, a.seed)
        results, versions, commands = {}, {}, {}
        _print_header()
        for kind in ([a.server_kind] if a.base_url else a.server):
            if a.base_url:
                results[kind] = _run_against(a, kind, a.base_url, tokenizer, prompts, levels)
                continue
            port = free_port()
            kv = a.kv_cache_memory or (2 << 30 if _on_cpu(a.device) else None)
            cmd = server_command(kind, model_dir, port, a.dtype, a.device, kv, _extra(a, kind))
            env = {"PAGED_BACKEND_TORCH_THREADS": str(a.server_threads), "OMP_NUM_THREADS": str(a.server_threads)} \
                if a.server_threads else {}
            if kind == "transformers":  # its /v1/models scans the hub cache and fails (HTTP 500) where there is none
                env["HF_HUB_CACHE"] = str(_hub_cache(workdir))
            print(f"[bench serve] starting {kind}: {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            proc = ServerProcess(kind, cmd, port, workdir / f"{kind}.log", env)
            try:
                fallback = str(model_dir) if kind == "transformers" else None  # it serves its command line's model
                model_id = proc.wait_ready(a.startup_timeout, fallback_id=fallback)
                print(f"[bench serve] {kind} ready in {time.perf_counter() - t0:.1f} s", flush=True)
                results[kind] = _measure(a, kind, proc.url, model_id, tokenizer, prompts, levels)
            finally:
                proc.stop()
            versions[kind], commands[kind] = server_version(kind), " ".join(cmd)
    report = dict(kind="serve", model=a.model, endpoint=a.endpoint, input_len=None if a.prompt_file else list(a.input_len),
                  prompt_file=a.prompt_file, output_len=a.output_len, slo=dict(ttft_s=a.slo_ttft, itl_s=a.slo_itl),
                  versions=versions, commands=commands, results=results, comparison=_compare(results),
                  saturation_rate={k: _saturation(v) for k, v in results.items()})
    for row in report["comparison"]:
        g = row["goodput_ratio"]
        print(f"ours / transformers at {row['mode']} {row['level']:g}: output tok/s {row['output_tok_per_s_ratio']:.2f}x, "
              f"goodput {'-' if g is None else f'{g:.2f}x'}, TTFT p50 {row['ttft_p50_s'][0]:.3f} / "
              f"{row['ttft_p50_s'][1]:.3f} s, ITL p50 {row['itl_p50_s'][0] * 1e3:.1f} / {row['itl_p50_s'][1] * 1e3:.1f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if a.plot:
        from paged_backend.bench.plot import write_serve_plot

        write_serve_plot(a.plot, report)
    return report


def _run_against(a, kind, base_url, tokenizer, prompts, levels):
    import httpx

    model_id = a.served_model or httpx.get(f"{base_url.rstrip('/')}/v1/models", timeout=10).json()["data"][0]["id"]
    return _measure(a, kind, base_url, model_id, tokenizer, prompts, levels)


def _on_cpu(device: str) -> bool:
    import torch

    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def _extra(a, kind: str) -> list[str]:
    import shlex

    return [x for s in (a.ours_args if kind == "ours" else a.transformers_args) or [] for x in shlex.split(s)]


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="streamed OpenAI requests against ours and/or transformers serve, per load level")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a shape (random weights), an HF folder, an alias or a .gguf (written out as an HF folder)")
    p.add_argument("--server", type=_servers, default=["ours"], help="ours, transformers, both (= ours,transformers)")
    p.add_argument("--base-url", default=None, help="drive a running server instead of starting one")
    p.add_argument("--server-kind", default="ours", choices=SERVERS, help="with --base-url: how it ignores EOS")
    p.add_argument("--served-model", default=None, help="with --base-url: the model id (default: first listed)")
    p.add_argument("--tokenizer", default=None, help="with --base-url: tokenizer folder (default --model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    p.add_argument("--concurrency", type=_ints, default=None, help="closed-loop levels, e.g. 1,4,16")
    p.add_argument("--request-rate", type=_floats, default=None, help="Poisson levels in req/s, e.g. 1,4,inf")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on in-flight requests at rate levels")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (rate levels: 64)")
    p.add_argument("--prompts-per-client", type=int, default=8, help="concurrency levels: N x this requests")
    p.add_argument("--input-len", type=_len_range, default=(256, 256),
                   help="prompt tokens, N or MIN:MAX (uniform, as workload A's 100:1024); the user message for chat")
    p.add_argument("--prompt-file", default=None, help="one prompt per line instead of random ones")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="requests (16 tokens) before measuring each server")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="seconds")
    p.add_argument("--slo-itl", type=float, default=0.05, help="seconds per output token (TPOT)")
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="bytes of KV cache for each server (CPU default 2 GiB, our engine's CPU default)")
    p.add_argument("--server-threads", type=int, default=None, help="torch threads of each server (default: its own)")
    p.add_argument("--ours-args", action="append", default=None, help="extra `paged-backend serve` flags, as --ours-args='--max-num-seqs 64'")
    p.add_argument("--transformers-args", action="append", default=None, help="extra `transformers serve` flags, as --transformers-args='--attn-implementation sdpa'")
    p.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--workdir", default=None, help="keep model folder and server logs here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: latency and throughput against the request rate")
    p.set_defaults(bench_func=serve)
