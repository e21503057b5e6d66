"""The offline batch API: `LLM(model).generate(prompts, params)` and `LLM.chat(conversations)`."""

from __future__ import annotations

import gc
import time
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from paged_backend.args import EngineArgs
from paged_backend.chat import render_chat
from paged_backend.engine.engine import Engine, EngineStats, coerce_params
from paged_backend.outputs import RequestOutput
from paged_backend.params import SamplingParams

Prompt = Union[str, list[int]]
ParamsArg = Union[SamplingParams, Sequence[SamplingParams], None]


class LLM:
    """An inference engine over one model, for batches of prompts.

    >>> llm = LLM("smollm2-135m-instruct")
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].outputs[0].text
    """

    def __init__(
        self,
        model: str,
        *,
        tokenizer: Optional[str] = None,
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
        quantization: Optional[str] = None,
        kv_cache_dtype: str = "auto",
    ):
        self.args = EngineArgs(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device, max_model_len=max_model_len,
            block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            load_format=load_format, seed=seed, enforce_eager=enforce_eager,
            quantization=quantization, kv_cache_dtype=kv_cache_dtype,
        )
        self._engine: Optional[Engine] = Engine(self.args)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("this LLM was shut down; create a new one")
        return self._engine

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        sampling_params: ParamsArg = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (str or token-id list); results in input order."""
        return self._run(_as_prompt_list(prompts), sampling_params, use_tqdm, prompt_texts=None)

    def chat(
        self,
        messages: Union[list[dict[str, Any]], Sequence[list[dict[str, Any]]]],
        sampling_params: ParamsArg = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: Optional[str] = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through the
        tokenizer's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not convs:
            raise ValueError("no conversation given")
        rendered = [
            render_chat(self.engine.tokenizer, c, add_generation_prompt, continue_final_message, chat_template)
            for c in convs
        ]
        return self._run([ids for _, ids in rendered], sampling_params, use_tqdm, [t for t, _ in rendered])

    def _run(self, prompts, sampling_params, use_tqdm, prompt_texts) -> list[RequestOutput]:
        engine = self.engine
        params = _per_prompt_params(sampling_params, len(prompts))
        ids: list[str] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                req = engine.add_request(p, sp)
                if prompt_texts is not None:
                    req.prompt = prompt_texts[i]
                ids.append(req.request_id)
        except Exception:
            for rid in ids:  # leave the engine as it was: no half-submitted batch
                engine.abort_request(rid)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[Optional[RequestOutput]] = [None] * len(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start, in_toks, out_toks = time.perf_counter(), 0, 0
        try:
            while any(r is None for r in results):
                for out in engine.step(emit_unfinished=False):
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
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

    # ---- lifecycle --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        if self._engine is None:
            return
        self._engine.shutdown()
        self._engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one tokenized prompt
        if not prompts:
            raise ValueError("no prompts given")
        return list(prompts)
    raise TypeError(f"prompts must be a str, a list of str or token-id lists; got {type(prompts).__name__}")


def _per_prompt_params(sampling_params: ParamsArg, n: int) -> list[SamplingParams]:
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != n:
            raise ValueError(f"{len(sampling_params)} sampling_params for {n} prompts: give one, or one per prompt")
        return [coerce_params(p) for p in sampling_params]
    return [coerce_params(sampling_params)] * n
