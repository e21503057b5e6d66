"""The offline batch API: `LLM(model).generate(prompts, params)` and `LLM.chat(conversations)`."""

from __future__ import annotations

import gc
import time
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from paged_backend.args import EngineArgs
from paged_backend.engine.engine import Engine
from paged_backend.engine.stats import EngineStats
from paged_backend.params import coerce_params
from paged_backend.outputs import RequestOutput
from paged_backend.params import SamplingParams
from paged_backend.prompts import PromptPreparer

Prompt = Union[str, list[int], dict]  # dict: vLLM's {"prompt": ...} / {"prompt_token_ids": ...}
ParamsArg = Union[SamplingParams, Sequence[SamplingParams], None]


class LLM:
    """An inference engine over one model, for batches of prompts.

    >>> llm = LLM("smollm2-135m-instruct")
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].outputs[0].text

    model: a bundled alias, HF directory or hub id, .gguf file — or an already-loaded transformers
    causal LM (used in place, with tokenizer= a tokenizer object or path). model_impl: "auto"
    (native code where there is one, else transformers' modeling code with paged attention),
    "native" or "transformers".
    """

    def __init__(
        self,
        model: Any,
        *,
        tokenizer: Any = None,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: Optional[int] = None,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory: Optional[int] = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: Optional[int] = None,
        enable_prefix_caching: bool = True,
        load_format: str = "auto",
        seed: int = 0,
        enforce_eager: bool = False,
        tensor_parallel_size: int = 1,
        model_impl: str = "auto",
        quantization: Optional[str] = None,
        kv_cache_dtype: str = "auto",
    ):
        self.args = EngineArgs(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device, max_model_len=max_model_len,
            block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            load_format=load_format, seed=seed, enforce_eager=enforce_eager, model_impl=model_impl,
            tensor_parallel_size=tensor_parallel_size, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
        )
        self._engine: Optional[Engine] = Engine(self.args)
        self._prepare: Optional[PromptPreparer] = PromptPreparer(self._engine)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("this LLM was shut down; create a new one")
        return self._engine

    @property
    def _prompts(self) -> PromptPreparer:
        """Turns prompts and conversations into (text, token ids) as generate() and chat() do."""
        if self._prepare is None:
            raise RuntimeError("this LLM was shut down; create a new one")
        return self._prepare

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        sampling_params: ParamsArg = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (str, token-id list, or vLLM's {"prompt": str} / {"prompt_token_ids":
        [...]} dict); results in input order."""
        return self._run([self._prompts.prompt(p) for p in _as_prompt_list(prompts)], sampling_params, use_tqdm)

    def chat(
        self,
        messages: Union[list[dict[str, Any]], Sequence[list[dict[str, Any]]]],
        sampling_params: ParamsArg = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: Optional[str] = None,
        tools: Optional[list[dict[str, Any]]] = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through the
        tokenizer's chat template. tools: function definitions for a template that takes them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not convs:
            raise ValueError("no conversation given")
        rendered = [self._prompts.chat(c, add_generation_prompt, continue_final_message, chat_template, tools)
                    for c in convs]
        return self._run(rendered, sampling_params, use_tqdm)

    def _run(self, prompts: list[tuple], sampling_params, use_tqdm) -> list[RequestOutput]:
        """prompts: (text or None, token ids) of each request."""
        engine = self.engine
        # one complete output per request, whatever output_kind says (as vLLM's LLM.generate)
        params = [p.model_copy(update={"output_kind": "final_only"}) if p.output_kind == "delta" else p
                  for p in per_prompt_params(sampling_params, len(prompts))]
        ids: list[str] = []
        try:
            for (text, p), sp in zip(prompts, params):
                ids.append(engine.add_request(p, sp, prompt_text=text).request_id)
        except Exception:
            for rid in ids:  # leave the engine as it was: no half-submitted batch
                engine.abort_request(rid)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[Optional[RequestOutput]] = [None] * len(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start, in_toks, out_toks = time.perf_counter(), 0, 0
        remaining = len(ids)
        try:
            while remaining:
                for out in engine.step(emit_unfinished=False):
                    if out.finished and out.request_id in order and results[order[out.request_id]] is None:
                        results[order[out.request_id]] = out
                        remaining -= 1
                        in_toks += len(out.prompt_token_ids)
                        out_toks += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(
                            f"est. speed input: {in_toks / elapsed:.2f} toks/s, output: {out_toks / elapsed:.2f} toks/s"
                        )
                        bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def generate_stream(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None
                        ) -> Iterator[RequestOutput]:
        """One prompt's outputs while it is generated, each carrying the deltas since the previous
        one (`text_delta`, `token_ids_delta`); the last one is finished. Closing the iterator early
        aborts the request."""
        engine = self.engine
        text, ids = self._prompts.prompt(prompt)
        rid = engine.add_request(ids, coerce_params(sampling_params), prompt_text=text).request_id
        finished = False
        try:
            while not finished:
                for out in engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                engine.abort_request(rid)

    # ---- lifecycle --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        if self._engine is None:
            return
        self._engine.shutdown()
        self._engine = self._prepare = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one tokenized prompt
        if not prompts:
            raise ValueError("no prompts given")
        return list(prompts)
    raise TypeError(f"prompts must be a str, a token-id list, a prompt dict or a list of those; got {type(prompts).__name__}")


def per_prompt_params(sampling_params: ParamsArg, n: int) -> list[SamplingParams]:
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != n:
            raise ValueError(f"{len(sampling_params)} sampling_params for {n} prompts: give one, or one per prompt")
        return [coerce_params(p) for p in sampling_params]
    return [coerce_params(sampling_params)] * n
