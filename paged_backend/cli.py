"""`paged-backend generate | chat | bench | serve`.

    paged-backend generate "What is the capital of France?"
    paged-backend chat --model smollm2-135m-instruct
    paged-backend bench throughput --model llama-3.2-1b --peers hf-generate,hf-generate-batch
    paged-backend bench latency --model llama-3.2-1b --batch-size 8
    paged-backend serve --model smollm2-135m-instruct --port 3000   # OpenAI-compatible, via BentoML
    paged-backend worker        # a tensor-parallel rank > 0 (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_MODEL = "smollm2-135m-instruct"


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF dir or hub id, .gguf file, or bundled alias")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache (CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--model-impl", default="auto", choices=["auto", "native", "transformers"],
                   help="native model code, or transformers' modeling code with paged attention (auto: native if any)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model across")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: float8_e4m3fn linear weights with per-channel scales (quantized at load)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="fp8: float8_e4m3fn KV cache with per-layer K/V scales")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", type=int, default=1, help="completions per prompt")


def _make_llm(a):
    from paged_backend import LLM

    return LLM(
        a.model, dtype=a.dtype, device=a.device, max_model_len=a.max_model_len, load_format=a.load_format,
        kv_cache_memory=a.kv_cache_memory, gpu_memory_utilization=a.gpu_memory_utilization,
        max_num_seqs=a.max_num_seqs, model_impl=a.model_impl, tensor_parallel_size=a.tensor_parallel_size,
        quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype,
    )


def _make_params(a):
    from paged_backend import SamplingParams

    return SamplingParams(
        n=a.n, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, stop=a.stop, seed=a.seed,
    )


def cmd_generate(a) -> int:
    llm = _make_llm(a)
    params = _make_params(a)
    use_template = not a.raw and bool(getattr(llm.get_tokenizer(), "chat_template", None))
    if use_template:
        outs = llm.chat([[{"role": "user", "content": p}] for p in a.prompts], params)
    else:
        outs = llm.generate(a.prompts, params)
    for prompt, out in zip(a.prompts, outs):
        for c in out.outputs:
            if len(a.prompts) > 1 or len(out.outputs) > 1:
                print(f"--- {prompt!r} [{c.index}]")
            print(c.text.strip() if use_template else c.text)
    llm.shutdown()
    return 0


def cmd_chat(a) -> int:
    llm = _make_llm(a)
    params = _make_params(a)
    history: list[dict[str, str]] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    print("paged-backend chat: empty line or Ctrl-D to quit, /reset to clear the history", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if a.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text.strip()
        print(reply)
        history.append({"role": "assistant", "content": reply})
    llm.shutdown()
    return 0


def cmd_bench(a) -> int:
    from paged_backend.bench.run import main as bench_main

    bench_main(a)
    return 0


def cmd_serve(a) -> int:
    cmd = [sys.executable, "-m", "bentoml", "serve", "paged_backend.adapters.bentoml:PagedLLMService",
           "--host", a.host, "--port", str(a.port)]
    args = dict(model=a.model, dtype=a.dtype, device=a.device, max_model_len=a.max_model_len,
                load_format=a.load_format, kv_cache_memory=a.kv_cache_memory,
                gpu_memory_utilization=a.gpu_memory_utilization, max_num_seqs=a.max_num_seqs,
                quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype,
                served_model_name=a.served_model_name, allowed_origins=a.allowed_origins,
                max_request_bytes=a.max_request_bytes, max_prompts_per_request=a.max_prompts_per_request,
                max_waiting_requests=a.max_waiting_requests, request_timeout_s=a.request_timeout,
                model_impl=a.model_impl, tensor_parallel_size=a.tensor_parallel_size)
    for k, v in args.items():
        if v is not None:
            cmd += ["--arg", f"{k}={v}"]
    if a.api_key:  # through the environment: --arg values would show in the process list
        os.environ["PAGED_BACKEND_API_KEY"] = a.api_key
    if a.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("PAGED_BACKEND_API_KEY"):
        print(f"warning: serving on {a.host} without an API key: anyone who can reach it can use it "
              "(--api-key or PAGED_BACKEND_API_KEY)", file=sys.stderr)
    os.execv(sys.executable, cmd)  # bentoml takes over this process: signals reach it directly


def _is_worker_rank() -> bool:
    from paged_backend.runtime.distributed import Rendezvous

    rdv = Rendezvous.from_environment()
    return rdv is not None and rdv.world_size > 1 and rdv.rank != 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="paged-backend", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate for one or more prompts")
    _engine_flags(g)
    _sampling_flags(g)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("prompts", nargs="+")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat through the model's chat template")
    _engine_flags(c)
    _sampling_flags(c)
    c.add_argument("--system", default=None)
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="throughput (workload A by default) or latency, against peers and the roofline")
    from paged_backend.bench.run import add_arguments

    add_arguments(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (bentoml serve PagedLLMService)")
    _engine_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) or 0.0.0.0 to expose it on purpose")
    s.add_argument("--port", type=int, default=3000)
    s.add_argument("--served-model-name", default=None, help="name(s) clients use, comma-separated")
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health (default: "
                        "$PAGED_BACKEND_API_KEY, else none)")
    s.add_argument("--allowed-origins", default=None, help="CORS: comma-separated origins (default: none)")
    s.add_argument("--max-request-bytes", type=int, default=None, help="larger bodies get 413 (default 4 MiB)")
    s.add_argument("--max-prompts-per-request", type=int, default=None,
                   help="prompts in one /v1/completions request (default 256)")
    s.add_argument("--max-waiting-requests", type=int, default=None,
                   help="requests accepted without a first token; beyond it 429 (default 1024)")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="seconds after which a request is aborted (default: none)")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="a tensor-parallel rank > 0; rank 0 (the engine) sends it everything else",
                       add_help=False)
    w.set_defaults(func=None)

    a, rest = parser.parse_known_args(argv)
    if a.func is None or _is_worker_rank():
        # `paged-backend worker`, or any command under torchrun on a rank other than 0: rank 0 runs
        # the command, the other ranks serve its steps.
        from paged_backend.runtime.worker import main as worker_main

        if a.func is None:
            return worker_main(rest)
        device = getattr(a, "device", "auto")
        return worker_main([] if device == "auto" else ["--device", device])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return a.func(a)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
