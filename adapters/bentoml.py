"""A BentoML service holding one `AsyncLLM` per worker, with OpenAI-compatible routes.

    bentoml serve paged_backend.adapters.bentoml:PagedLLMService --arg model=smollm2-135m-instruct \\
        --arg max_model_len=2048 --arg served_model_name=smollm2

then any OpenAI client: POST /v1/chat/completions and /v1/completions (`stream: true` as server-sent
events ending in `data: [DONE]`), GET /v1/models; GET /stats (the engine's stats), GET /health;
and BentoML's own `POST /generate` (streams plain text) with /readyz, /livez, /metrics.

Arguments (`--arg key=value`, or environment variables `PAGED_BACKEND_<KEY>`, upper-case; --arg
wins): `model`, `served_model_name` (comma-separated aliases; default: the model argument),
`torch_threads`, and every `EngineArgs` field (dtype, device, max_model_len, kv_cache_memory,
max_num_seqs, load_format, gpu_memory_utilization, ...).

Your own bento with its own resources and traffic settings:

    # service.py
    from paged_backend.adapters.bentoml import make_service
    LLMService = make_service("LLMService", engine_args={"model": "/models/qwen"},
                              resources={"gpu": 1}, traffic={"timeout": 600, "max_concurrency": 64})
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, AsyncGenerator, Optional

import bentoml  # the real package: this module is paged_backend.adapters.bentoml, imports are absolute
from pydantic import BaseModel, ConfigDict, ValidationError

from paged_backend import AsyncLLM, EngineArgs, SamplingParams

from .openai_server import OpenAIServing, build_app

logger = logging.getLogger("paged_backend.adapters")

DEFAULT_MODEL = "smollm2-135m-instruct"
ENV_PREFIX = "PAGED_BACKEND_"


class ServiceArgs(BaseModel):
    """What the service reads besides the engine's own arguments."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    served_model_name: Optional[str] = None
    torch_threads: Optional[int] = None

    def names(self, model: str) -> list[str]:
        if not self.served_model_name:
            return [model]
        return [n.strip() for n in self.served_model_name.split(",") if n.strip()]


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


def _torch_threads(args: ServiceArgs) -> Optional[int]:
    """torch's intra-op threads: `torch_threads` if given; on a machine without CUDA, one fewer than
    the cores this process may use, because the event loop (HTTP, SSE, detokenized deltas) needs a
    core of its own on every token, and intra-op threads that spin at their barriers take it away
    (measured on 2 cores: 2 threads made a busy server >10x slower than 1; BENCHMARKS.md)."""
    if args.torch_threads:
        return args.torch_threads
    env = os.environ.get("PAGED_BACKEND_TEST_THREADS")  # tests on busy 2-core machines
    if env:
        return int(env)
    import torch

    if torch.cuda.is_available():
        return None
    return max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") else None


def make_service(name: str = "PagedLLMService", *, engine_args: Optional[dict[str, Any]] = None,
                 **service_config: Any) -> Any:
    """A `@bentoml.service` class serving one AsyncLLM per worker. `engine_args` are defaults that
    --arg and environment variables override; `service_config` goes to `bentoml.service` (resources,
    traffic, workers, envs, ...). Assign the result to a module-level name, as BentoML requires."""
    holder: dict[str, OpenAIServing] = {}
    app = build_app(lambda: holder.get("serving"))
    traffic = {"timeout": 3600, **service_config.pop("traffic", {})}  # long CPU generations
    defaults = dict(engine_args or {})

    class _Service:
        def __init__(self) -> None:
            engine_kwargs, args = resolve_args(defaults)
            threads = _torch_threads(args)
            if threads:
                import torch

                torch.set_num_threads(threads)
            model = engine_kwargs.pop("model")
            logger.info("loading %s with %s", model, engine_kwargs)
            self.llm = AsyncLLM(model, **engine_kwargs)
            holder["serving"] = OpenAIServing(self.llm, args.names(model), model_root=model)

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
                                    stop=stop, seed=seed)
            async for out in self.llm.generate(prompt, params):
                if out.outputs[0].text_delta:
                    yield out.outputs[0].text_delta

        @bentoml.on_shutdown
        def shutdown(self) -> None:
            holder.pop("serving", None)
            self.llm.shutdown()

    _Service.__name__ = _Service.__qualname__ = name
    _Service.__doc__ = f"paged-backend LLM service {name}: OpenAI-compatible routes over one AsyncLLM."
    _Service.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)
    svc = bentoml.service(name=name, traffic=traffic, **service_config)(bentoml.asgi_app(app, path="/")(_Service))
    # BentoML finds a service's import path from the module that called bentoml.service, which is
    # this one; the class belongs to make_service's caller.
    svc._caller_module = _Service.__module__
    return svc


PagedLLMService = make_service("PagedLLMService")
