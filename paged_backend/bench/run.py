"""`paged-backend bench throughput | latency`: our engine and its peers on one workload, one run.

    paged-backend bench throughput --model llama-3.2-1b --peers hf-generate,hf-generate-batch \\
        --json out.json --plot out.png                         # workload A on the GPU
    paged-backend bench latency --model llama-3.2-1b --batch-size 8 --input-len 512 --output-len 128
    paged-backend bench throughput --model tiny --num-prompts 8 --device cpu   # smoke test on the CPU

--model is a shape in SHAPES (random weights, the default) or any model the engine loads (then
--load-format as for LLM). Throughput prints requests/s, total and output tok/s, the ratio to each
peer and the fraction of the roofline (roofline.py) measured on this machine in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from paged_backend.bench import peers as peers_mod
from paged_backend.bench import serve as serve_mod
from paged_backend.bench.plot import write_plot
from paged_backend.bench.roofline import ModelCost, Rates, floor_seconds, measure_rates
from paged_backend.bench.structured import BENCH_SCHEMA, use_byte_level_tokenizer
from paged_backend.bench.step_probe import describe, probe_steps, with_floors
from paged_backend.bench.workload import SHAPES, Request, make_model_dir, prompt_file_dataset, random_dataset


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or MIN:MAX with 1 <= MIN <= MAX")
    return lo_i, hi_i


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _engine(a, model_dir: str, model_impl: str = "auto"):
    from paged_backend import LLM

    kw = dict(dtype=a.dtype, device=a.device, max_model_len=a.max_model_len, load_format=a.load_format,
              max_num_seqs=a.max_num_seqs, model_impl=model_impl, tensor_parallel_size=a.tensor_parallel_size,
              quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype, enforce_eager=a.enforce_eager)
    if a.kv_cache_memory:
        kw["kv_cache_memory"] = a.kv_cache_memory
    print(f"[bench] loading our engine ({model_dir}; weight loading, KV sizing, CUDA graph capture)", flush=True)
    t0 = time.perf_counter()
    llm = LLM(model_dir, **kw)
    print(f"[bench] our engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return llm, time.perf_counter() - t0


def _drive(llm, requests: list[Request], schema=None) -> tuple[float, list[tuple[float, int]], list]:
    """All requests at once through the engine; (seconds, [(t, tokens generated so far)] per step, outputs).
    schema: every request constrained to this JSON schema (structured outputs)."""
    from paged_backend import SamplingParams

    structured = None if schema is None else {"json": schema}

    engine = llm.engine
    base = engine.total_generated_tokens
    _sync()
    t0 = time.perf_counter()
    for r in requests:
        engine.add_request(r.prompt, SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True,
                                                    structured_outputs=structured))
    timeline, outputs = [], []
    while engine.has_unfinished_requests():
        outputs += engine.step(emit_unfinished=False)
        timeline.append((time.perf_counter() - t0, engine.total_generated_tokens - base))
    _sync()
    return time.perf_counter() - t0, timeline, outputs


def _warm_up(llm, requests: list[Request]) -> None:
    _drive(llm, [Request(r.prompt, min(8, r.output_len)) for r in requests[:4]])


def _model(a, tmp: str) -> tuple[str, str]:
    """(model path, load format): a shape becomes a config + tokenizer directory with dummy weights."""
    if a.model in SHAPES:
        path = make_model_dir(a.model, Path(tmp))
        if getattr(a, "structured", None):
            use_byte_level_tokenizer(path, SHAPES[a.model][1]["vocab_size"])
        return str(path), "dummy"
    return a.model, a.load_format


def _dataset(a, llm) -> list[Request]:
    if a.prompt_file:
        return prompt_file_dataset(a.prompt_file, llm.engine.tokenizer, a.output_len, a.seed)
    return random_dataset(a.num_prompts, a.input_len, a.output_len, llm.engine.vocab_size, a.seed)


def throughput(a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model, a.load_format = _model(a, tmp)
        results, probe, structured = [], None, None
        for impl in a.model_impl:  # several: each runs in turn, the first is the one peers are compared with
            llm, startup_s = _engine(a, model, impl)
            device, dtype, config = llm.engine.device, llm.engine.dtype, llm.engine.hf_config
            requests = _dataset(a, llm)
            _warm_up(llm, requests)
            print(f"[bench] paged-backend [{impl}]: {len(requests)} requests", flush=True)
            seconds, run_timeline, outs = _drive(llm, requests)
            if a.structured and not results:  # the constrained twin of the first run, same engine
                structured = _structured_run(llm, requests)
            stats = llm.stats()
            print(f"[bench] paged-backend [{impl}]: {seconds:.2f} s", flush=True)
            if not results and a.probe_batch:  # the step diagnostics of the first run's engine
                probe = probe_steps(llm, min(a.probe_batch, a.max_num_seqs), a.probe_prompt_len)
            llm.shutdown()
            del llm
            out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            if not results:
                timeline = run_timeline  # the plot shows the first run's
            results.append(dict(name="paged-backend" + ("" if impl == "auto" else f" [{impl}]"), seconds=seconds,
                                output_tokens=out_tokens, startup_s=startup_s, steps=stats.num_steps,
                                preemptions=stats.num_preemptions, requests=len(requests)))
        ours = results[0]
        peer_requests = requests[: a.peer_num_prompts] if a.peer_num_prompts else requests
        for name in a.peers:
            if name == "hf-device-map":  # the model over tp GPUs, one layer range per GPU
                from paged_backend.bench.peer_device_map import hf_device_map

                results.append(hf_device_map(Path(model), peer_requests, dtype, a.tensor_parallel_size))
            else:
                results.append(peers_mod.run_peer(name, Path(model), peer_requests, dtype, device.type))
    print("[bench] measuring copy bandwidth and matmul rate", flush=True)
    rates = measure_rates(device, dtype, fp8_matmul=stats.quantization == "fp8")
    tp = a.tensor_parallel_size
    # Bytes as the engine stores them (fp8 weights and an fp8 cache count one byte per element); with tp
    # GPUs each reads 1/tp of the weights and KV and does 1/tp of the FLOPs (rates measured on one).
    cost = ModelCost.of(config, torch.finfo(dtype).bits // 8, weight_bytes=stats.weight_bytes * tp,
                        kv_bytes_per_token=stats.kv_bytes_per_token * tp)
    floor = floor_seconds(cost, [len(r.prompt) for r in requests], [r.output_len for r in requests],
                          Rates(rates.copy_bytes_per_s * tp, rates.matmul_flops_per_s * tp))
    floor.update(num_gpus=tp, all_reduce=_all_reduce_bytes(config, torch.finfo(dtype).bits // 8, tp, a.max_num_seqs))
    in_tokens = sum(len(r.prompt) for r in requests)
    for r in results:
        # the floor is that of all requests: a peer on fewer (--peer-num-prompts) has none
        full = r["requests"] == len(requests)
        r.update(requests_per_s=r["requests"] / r["seconds"], output_tok_per_s=r["output_tokens"] / r["seconds"],
                 total_tok_per_s=(in_tokens + r["output_tokens"]) / r["seconds"],
                 roofline_fraction=floor["total_s"] / r["seconds"] if full else None,
                 roofline_per_op_fraction=floor["total_per_op_s"] / r["seconds"] if full else None)
    for r in results[1:]:  # by output rate: a peer may have run fewer requests (--peer-num-prompts)
        ours[f"vs_{r.get('peer', r['name'])}"] = ours["output_tok_per_s"] / r["output_tok_per_s"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = dict(kind="throughput", model=a.model, device=where, dtype=str(dtype), quantization=stats.quantization,
                  kv_cache_dtype=stats.kv_cache_dtype, weight_bytes=stats.weight_bytes,
                  kv_bytes_per_token=stats.kv_bytes_per_token, num_requests=len(requests),
                  input_tokens=in_tokens, rates=rates.as_dict(), floor=floor, results=results, timeline=timeline,
                  step_probe=probe and with_floors(probe, cost, rates))
    report["step_probe_lines"] = describe(report["step_probe"]) if probe else []
    _print_throughput(report)
    if structured:
        report["structured"] = structured
        print(f"--structured json: {structured['output_tok_per_s']:.0f} output tok/s = "
              f"{structured['output_tok_per_s'] / ours['output_tok_per_s']:.1%} of unconstrained in the same run "
              f"({structured['output_tokens']} tokens in {structured['seconds']:.2f} s)")
    _write(a, report, timeline, f"{a.model}, {len(requests)} requests, {where}")
    return report


def _structured_run(llm, requests: list[Request]) -> dict:
    """The same requests, each constrained to BENCH_SCHEMA (compiled during the warm-up)."""
    _drive(llm, [Request(r.prompt, min(8, r.output_len)) for r in requests[:4]], BENCH_SCHEMA)
    seconds, _, outs = _drive(llm, requests, BENCH_SCHEMA)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(seconds=seconds, output_tokens=tokens, output_tok_per_s=tokens / seconds)


def _print_throughput(rep: dict) -> None:
    r0 = rep["rates"]
    print(f"\n{rep['model']} on {rep['device']} ({rep['dtype']}, weights {rep['quantization'] or 'unquantized'} "
          f"{rep['weight_bytes'] / 2**30:.2f} GiB, KV {rep['kv_cache_dtype']} {rep['kv_bytes_per_token']} B/token): "
          f"{rep['num_requests']} requests, "
          f"{rep['input_tokens']} prompt tokens | measured: copy {r0['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"matmul {r0['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s | roofline {rep['floor']['total_s']:.2f} s "
          f"(prefill {rep['floor']['prefill_s']:.2f} + decode {rep['floor']['decode_s']:.2f})")
    ours = rep["results"][0]
    print(f"{'engine':72s} {'seconds':>8s} {'req/s':>7s} {'tok/s':>9s} {'out tok/s':>10s} {'ours vs':>8s} {'roofline':>9s}")
    for r in rep["results"]:
        ratio = "-" if r is ours else f"{ours['output_tok_per_s'] / r['output_tok_per_s']:.2f}x"
        print(f"{r['name'][:72]:72s} {r['seconds']:8.2f} {r['requests_per_s']:7.2f} {r['total_tok_per_s']:9.0f} "
              f"{r['output_tok_per_s']:10.0f} {ratio:>8s} "
              f"{'-' if r['roofline_fraction'] is None else format(r['roofline_fraction'], '.1%'):>9s}")
    fl = rep["floor"]
    print(f"per-operation roofline {fl['total_per_op_s']:.2f} s (decode {fl['decode_per_op_s']:.2f}: each step's linears "
          f"and attention each at the longer of their bytes and FLOPs): paged-backend at "
          f"{ours['roofline_per_op_fraction']:.1%} of it")
    print(f"start-up of our engine (load, KV sizing, CUDA graphs): {ours['startup_s']:.1f} s")
    ar = rep["floor"].get("all_reduce")
    if rep["floor"].get("num_gpus", 1) > 1 and ar:
        print(f"tensor parallel over {rep['floor']['num_gpus']} GPUs (roofline: {rep['floor']['num_gpus']}x one GPU's "
              f"measured rates): {ar['per_step_per_layer']} all-reduces per layer per step, a decode step of "
              f"{ar['decode_batch']} sequences all-reduces {ar['decode_step_bytes'] / 2**20:.1f} MiB per GPU")
    for r in rep["results"]:
        if "compile_s" in r:
            print(f"{r['peer']}: warm-up {r['warmup_s']:.1f} s before timing, of which compilation ~{r['compile_s']:.1f} s")
    if rep["step_probe"]:
        print("\n".join(rep["step_probe_lines"]))


def _all_reduce_bytes(config, dtype_bytes: int, tp: int, batch: int) -> dict:
    """Megatron cut: after o_proj and after down_proj in every layer, plus the vocab-parallel
    embedding; each all-reduces [tokens, hidden]. Zero with one GPU."""
    per_token = (2 * config.num_hidden_layers + 1) * config.hidden_size * dtype_bytes if tp > 1 else 0
    return dict(per_step_per_layer=2 if tp > 1 else 0, bytes_per_token=per_token, decode_batch=batch,
                decode_step_bytes=per_token * batch)


def latency(a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model, a.load_format = _model(a, tmp)
        llm, startup_s = _engine(a, model, a.model_impl[0])

        def batch(i: int) -> list[Request]:  # fresh prompts each run: no run reuses another's cached prefix
            return random_dataset(a.batch_size, a.input_len, a.output_len, llm.engine.vocab_size, a.seed + i)

        # one untimed run of a batch of the timed runs' shape: any compile or allocation it triggers
        # happens before timing
        print(f"[bench] warm-up: batch {a.batch_size}", flush=True)
        _drive(llm, batch(a.num_iters))
        runs = []
        for i in range(a.num_iters):
            seconds, _, outs = _drive(llm, batch(i))
            ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
            itl = [x for o in outs for x in o.metrics.inter_token_latencies]
            runs.append(dict(seconds=seconds, ttft=statistics.median(ttft), itl=statistics.mean(itl) if itl else 0.0))
        llm.shutdown()
    lat = sorted(r["seconds"] for r in runs)
    report = dict(kind="latency", model=a.model, batch_size=a.batch_size, startup_s=startup_s, runs=runs,
                  median_s=statistics.median(lat), p90_s=lat[min(len(lat) - 1, int(0.9 * len(lat)))],
                  median_ttft_s=statistics.median(r["ttft"] for r in runs),
                  mean_itl_s=statistics.mean(r["itl"] for r in runs))
    print(f"\n{a.model}: batch {a.batch_size}, input {a.input_len}, output {a.output_len}, {a.num_iters} runs: "
          f"median {report['median_s']:.3f} s, p90 {report['p90_s']:.3f} s, TTFT {report['median_ttft_s'] * 1e3:.1f} ms, "
          f"inter-token {report['mean_itl_s'] * 1e3:.2f} ms")
    _write(a, report, None, "")
    return report


def _write(a, report: dict, timeline, title: str) -> None:
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if getattr(a, "plot", None):
        write_plot(a.plot, report["results"], timeline, title)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_cmd", required=True)
    t = sub.add_parser("throughput", help="many requests at once: requests/s, tok/s, vs peers, roofline")
    lat = sub.add_parser("latency", help="one batch at a time: end-to-end latency, TTFT, inter-token")
    for q in (t, lat):
        q.add_argument("--model", default="llama-3.2-1b",
                       help=f"a shape with random weights ({', '.join(sorted(SHAPES))}) or any model path/alias")
        q.add_argument("--load-format", default="auto", help="for a model path (shapes are always dummy)")
        q.add_argument("--dtype", default="auto")
        q.add_argument("--device", default="auto")
        q.add_argument("--max-model-len", type=int, default=2048)
        q.add_argument("--max-num-seqs", type=int, default=256)
        q.add_argument("--kv-cache-memory", type=int, default=None)
        q.add_argument("--quantization", default=None, choices=["fp8"])
        q.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
        q.add_argument("--output-len", type=_range, default=(256, 256), help="N or MIN:MAX")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--model-impl", default=["auto"], type=lambda s: [x for x in s.split(",") if x],
                       help="auto | native | transformers; comma-separated runs each in turn (throughput)")
        q.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split across")
        q.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
        q.add_argument("--json", default=None, help="write the results here")
    t.add_argument("--num-prompts", type=int, default=256)
    t.add_argument("--input-len", type=_range, default=(100, 1024), help="N or MIN:MAX (random token ids)")
    t.add_argument("--prompt-file", default=None, help="one prompt per line instead of random token ids")
    t.add_argument("--peers", default="", type=lambda s: [x for x in s.split(",") if x],
                   help=f"comma-separated, from {', '.join(peers_mod.PEERS)}")
    t.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    t.add_argument("--structured", choices=["json"], default=None,
                   help="also run every request constrained to one JSON schema; compare in the same run")
    t.add_argument("--peer-num-prompts", type=int, default=None,
                   help="run the peers on the first N requests only (ratios compare output tok/s)")
    t.add_argument("--probe-batch", type=int, default=256,
                   help="after the run: decode step wall vs GPU time and prefill vs its floor at this batch (0: skip)")
    t.add_argument("--probe-prompt-len", type=int, default=512)
    t.set_defaults(bench_func=throughput)
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--input-len", type=_range, default=(512, 512))
    lat.add_argument("--num-iters", type=int, default=5)
    lat.set_defaults(bench_func=latency)
    serve_mod.add_parser(sub)


def check_peers(a) -> None:
    peers = getattr(a, "peers", [])
    bad = [x for x in peers if x not in peers_mod.PEERS and x != "hf-device-map"]
    if bad:
        raise ValueError(f"unknown peer(s) {bad}: choose from {list(peers_mod.PEERS)}")
    if peers and a.model not in SHAPES:  # checked before our engine runs, not after
        raise ValueError(f"peers run on dummy-weight shapes only (--model one of {sorted(SHAPES)})")


def main(a) -> dict:
    check_peers(a)
    return a.bench_func(a)
