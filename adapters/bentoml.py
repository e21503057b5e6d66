"""A BentoML service holding one `AsyncLLM` per worker, with OpenAI-compatible routes.

    bentoml serve paged_backend.adapters.bentoml:PagedLLMService --arg model=smollm2-135m-instruct \\
        --arg max_model_len=2048 --arg served_model_name=smollm2

then any OpenAI client: POST /v1/chat/completions and /v1/completions (`stream: true` as server-sent
events ending in `data: [DONE]`), GET /v1/models, POST /tokenize and /detokenize; GET /stats (the
engine's stats), GET /health; and BentoML's own `POST /generate` (streams plain text) with /readyz,
/livez and /metrics (BentoML's HTTP metrics and the engine's `paged_backend:*` ones).

It listens on 127.0.0.1 unless told otherwise (`--host 0.0.0.0` exposes it: set an api_key first).

Arguments (`--arg key=value`, or environment variables `PAGED_BACKEND_<KEY>`, upper-case; --arg
wins): `model`, `served_model_name` (comma-separated aliases; default: the model argument, or the
last part of it when it is a local path), `torch_threads`, `api_key` (prefer the environment
variable PAGED_BACKEND_API_KEY: --arg values show in the process list), `allowed_origins` (CORS,
comma-separated), `max_request_bytes`, `max_prompts_per_request`, `max_waiting_requests`,
`request_timeout_s`, and every `EngineArgs` field (dtype, device, max_model_len, kv_cache_memory,
max_num_seqs, load_format, gpu_memory_utilization, ...).

Your own bento with its own resources and traffic settings:

    # service.py
    from paged_backend.adapters.bentoml import make_service
    LLMService = make_service("LLMService", engine_args={"model": "/models/qwen"},
                              resources={"gpu": 1}, traffic={"timeout": 600, "max_concurrency": 64})
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any, AsyncGenerator, Optional

import bentoml  # the real package: this module is paged_backend.adapters.bentoml, imports are absolute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from paged_backend import AsyncLLM, EngineArgs, SamplingParams

from .metrics import EngineMetrics
from .openai_server import OpenAIServing, ServerLimits, build_app
from .security import GuardSettings, ServiceGuard

logger = logging.getLogger("paged_backend.adapters")

DEFAULT_MODEL = "smollm2-135m-instruct"
ENV_PREFIX = "PAGED_BACKEND_"


class ServiceArgs(BaseModel):
    """What the service reads besides the engine's own arguments."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    served_model_name: Optional[str] = None
    torch_threads: Optional[int] = None
    api_key: Optional[str] = None
    allowed_origins: Optional[str] = None  # comma-separated; none: no cross-origin browser access
    max_request_bytes: int = Field(GuardSettings.max_request_bytes, ge=1)
    max_prompts_per_request: int = Field(ServerLimits.max_prompts_per_request, ge=1)
    max_waiting_requests: int = Field(ServerLimits.max_waiting_requests, ge=1)
    request_timeout_s: Optional[float] = Field(None, gt=0)

    def names(self, model: str) -> list[str]:
        """The names clients see; never a local directory (its last part stands for it)."""
        if self.served_model_name:
            return [n.strip() for n in self.served_model_name.split(",") if n.strip()]
        if os.path.exists(model):
            return [os.path.basename(os.path.normpath(model))]
        return [model]

    def limits(self) -> ServerLimits:
        return ServerLimits(max_prompts_per_request=self.max_prompts_per_request,
                            max_waiting_requests=self.max_waiting_requests, request_timeout_s=self.request_timeout_s)

    def origins(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in (self.allowed_origins or "").split(",") if o.strip())


def _known_keys() -> set[str]:
    return set(EngineArgs.model_fields) | set(ServiceArgs.model_fields)


def resolve_args(defaults: Optional[dict[str, Any]] = None,
                 cli_args: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], ServiceArgs]:
    """(engine kwargs, service args) from, in rising priority: `defaults`, PAGED_BACKEND_<KEY>
    environment variables, `bentoml serve --arg key=value`."""
    known = _known_keys()
    merged: dict[str, Any] = {"model": DEFAULT_MODEL}
    merged.update(defaults or {})
    for key in known:
        env = os.environ.get(ENV_PREFIX + key.upper())
        if env is not None and env != "":
            merged[key] = env
    if cli_args is None:
        cli_args = dict(vars(bentoml.use_arguments()))
    unknown = sorted(set(cli_args) - known)
    if unknown:
        raise ValueError(f"unknown --arg {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    merged.update(cli_args)
    service = {k: merged.pop(k) for k in list(merged) if k in ServiceArgs.model_fields}
    try:
        return merged, ServiceArgs(**service)
    except ValidationError as e:
        raise ValueError(f"bad service argument: {e}") from e


_ALL_CORES_UP_TO = 4  # cores; above it the event loop keeps one


def _torch_threads(args: ServiceArgs) -> Optional[int]:
    """torch's intra-op threads: `torch_threads` if given; on a machine without CUDA, every core this
    process may use, less one for the event loop (HTTP, SSE, detokenized deltas) once there are more
    than _ALL_CORES_UP_TO. On a 2-core laptop one decode stream is bound by memory bandwidth, which one
    core cannot draw alone (measured: 10.9 GB/s with one thread, 21.7 with two), so leaving a core to
    the event loop halves the tokens per second while the loop needs ~1 ms of it per token
    (BENCHMARKS.md, issue 21). On a machine shared with other busy processes, intra-op threads spin at
    their barriers while the others hold the cores: set torch_threads lower there."""
    if args.torch_threads:
        return args.torch_threads
    env = os.environ.get("PAGED_BACKEND_TEST_THREADS")  # tests on busy 2-core machines
    if env:
        return int(env)
    import torch

    if torch.cuda.is_available() or not hasattr(os, "sched_getaffinity"):
        return None
    cores = len(os.sched_getaffinity(0))
    return cores if cores <= _ALL_CORES_UP_TO else cores - 1


def make_service(name: str = "PagedLLMService", *, engine_args: Optional[dict[str, Any]] = None,
                 **service_config: Any) -> Any:
    """A `@bentoml.service` class serving one AsyncLLM per worker. `engine_args` are defaults that
    --arg and environment variables override; `service_config` goes to `bentoml.service` (resources,
    traffic, workers, envs, ...). Assign the result to a module-level name, as BentoML requires."""
    holder: dict[str, OpenAIServing] = {}
    app = build_app(lambda: holder.get("serving"))
    traffic = {"timeout": 3600, **service_config.pop("traffic", {})}  # long CPU generations
    # Loopback unless the operator says otherwise (`bentoml serve --host 0.0.0.0`, or http={"host": ...}).
    http = {"host": "127.0.0.1", **service_config.pop("http", {})}
    defaults = dict(engine_args or {})
    resolved: list[tuple[dict[str, Any], ServiceArgs]] = []

    def arguments() -> tuple[dict[str, Any], ServiceArgs]:
        """Read once per worker: by the guard on the first request or by the service, whichever is first."""
        if not resolved:
            resolved.append(resolve_args(defaults))
        engine_kwargs, args = resolved[0]
        return dict(engine_kwargs), args

    async def refresh_metrics() -> None:
        serving = holder.get("serving")
        if serving is not None and serving.metrics is not None:
            await asyncio.to_thread(serving.metrics.refresh)

    def guard_settings() -> GuardSettings:
        args = arguments()[1]
        return GuardSettings(api_key=args.api_key or None, allowed_origins=args.origins(),
                             max_request_bytes=args.max_request_bytes, on_metrics_scrape=refresh_metrics)

    class _Service:
        def __init__(self) -> None:
            engine_kwargs, args = arguments()
            threads = _torch_threads(args)
            if threads:
                import torch

                torch.set_num_threads(threads)
            model = engine_kwargs.pop("model")
            logger.info("loading %s with %s", args.names(model)[0], engine_kwargs)
            self.llm = AsyncLLM(model, **engine_kwargs)
            names = args.names(model)
            self.serving = OpenAIServing(self.llm, names, aliases=(model,), limits=args.limits(),
                                         metrics=EngineMetrics(self.llm, names[0]))
            holder["serving"] = self.serving

        @bentoml.api
        async def generate(
            self,
            prompt: str,
            max_tokens: int = 128,
            temperature: float = 0.0,
            top_p: float = 1.0,
            top_k: int = -1,
            stop: Optional[list[str]] = None,
            seed: Optional[int] = None,
        ) -> AsyncGenerator[str, None]:
            """Streams the completion of `prompt` as text."""
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    stop=stop, seed=seed, output_kind="delta")
            async for out in self.llm.generate(prompt, params):
                if out.finished:
                    self.serving.metrics.observe(out)
                if out.outputs[0].text_delta:
                    yield out.outputs[0].text_delta

        @bentoml.on_shutdown
        def shutdown(self) -> None:
            holder.pop("serving", None)
            self.llm.shutdown()

    _Service.__name__ = _Service.__qualname__ = name
    _Service.__doc__ = f"paged-backend LLM service {name}: OpenAI-compatible routes over one AsyncLLM."
    _Service.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)
    svc = bentoml.service(name=name, traffic=traffic, http=http, **service_config)(
        bentoml.asgi_app(app, path="/")(_Service))
    svc.add_asgi_middleware(ServiceGuard, settings=guard_settings)
    # BentoML finds a service's import path from the module that called bentoml.service, which is
    # this one; the class belongs to make_service's caller.
    svc._caller_module = _Service.__module__
    return svc


PagedLLMService = make_service("PagedLLMService")
