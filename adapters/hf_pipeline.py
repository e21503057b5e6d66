"""A drop-in for `transformers.pipeline("text-generation", ...)` served by the paged engine.

    from paged_backend.adapters.hf_pipeline import pipeline      # instead of `from transformers import pipeline`
    gen = pipeline("text-generation", model="smollm2-135m-instruct")
    gen(["Hello", "Bonjour"], max_new_tokens=32)   # [[{"generated_text": ...}], [{"generated_text": ...}]]

Called like transformers' TextGenerationPipeline, with the same defaults (its own max_new_tokens=256,
do_sample=True, temperature=0.7 unless the model's generation_config.json says otherwise, then
generate()'s global defaults such as top_k=50) and the same output format. What it changes: every
prompt of a call goes to the engine at once (continuous batching), whatever batch_size says.
A generation or pipeline argument the engine cannot honour raises ValueError; none is ignored.

A subclass of transformers' TextGenerationPipeline: its own parameter handling (`_sanitize_parameters`),
`preprocess` (tokenising, chat templates, prefix, "hole" truncation) and `postprocess` (return types,
full text, chat replies) run unchanged; only the generation step is the engine's.

Also registered as the task "paged-text-generation", so `transformers.pipeline("paged-text-generation",
model=...)` works: there `model` is an HF directory or hub id with a config.json (transformers reads
the config before the pipeline sees the model), or an existing `LLM` (for aliases and .gguf files).
"""

from __future__ import annotations

import copy
import os
import types
from typing import Any, Iterable, Iterator, Optional

import torch
from transformers import AutoConfig, GenerationConfig, TextGenerationPipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils.chat_template_utils import Chat, is_valid_message

from paged_backend import LLM, SamplingParams

TASK = "text-generation"
REGISTERED_TASK = "paged-text-generation"

# LLM(...) keywords that pipeline(..., **kwargs) or model_kwargs may carry to the engine.
ENGINE_KWARGS = {"tokenizer", "max_model_len", "block_size", "gpu_memory_utilization", "kv_cache_memory",
                 "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "load_format", "seed"}
# TextGenerationPipeline._default_generation_config, applied where neither the user nor the model set them.
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
SAMPLING_ONLY = {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}
GENERATION_KEYS = {k for k in vars(GenerationConfig()) if not k.startswith("_")}
# Generation parameters the engine maps onto SamplingParams.
HANDLED = {"max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k",
           "top_p", "min_p", "repetition_penalty", "num_return_sequences", "stop_strings", "eos_token_id",
           "pad_token_id", "bos_token_id", "decoder_start_token_id"}
# Parameters that change how transformers computes, never what it outputs for the decoding the engine does.
NO_OUTPUT_EFFECT = {"use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config",
                    "disable_compile", "transformers_version", "length_penalty", "early_stopping",
                    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                    "assistant_lookbehind", "target_lookbehind", "is_assistant", "low_memory", "prefill_chunk_size"}


class PagedTextGenerationPipeline(TextGenerationPipeline):
    """transformers' TextGenerationPipeline, called the same way, run by paged_backend's engine.

    Pipeline.__init__ is not called: it loads and places a transformers model. This sets what the
    inherited methods read instead (tokenizer, generation config and defaults, init-time parameters)."""

    _load_tokenizer = _load_processor = _load_image_processor = _load_video_processor = False
    _load_feature_extractor = False

    def __init__(self, model, tokenizer=None, task: str = TASK, device=None, dtype=None, batch_size=None,
                 num_workers=None, **kwargs):
        if isinstance(model, _PendingModel):  # from transformers.pipeline(): build the engine now that device is known
            model = model.build(device=device, dtype=dtype, tokenizer=tokenizer)
        elif _is_model_object(model):  # a loaded transformers model (transformers.pipeline(task, model=obj))
            model = _llm_of_model_object(model, tokenizer, device, dtype, {})
        elif not isinstance(model, LLM):
            raise TypeError(f"model must be a paged_backend.LLM (or a name/path, through pipeline()); "
                            f"got {type(model).__name__}")
        elif tokenizer is not None or dtype not in (None, "auto") or device is not None:
            raise ValueError("model is an existing LLM, whose tokenizer, dtype and device are fixed: give them to "
                             "LLM(model, tokenizer=..., dtype=..., device=...) instead")
        self.task, self.model, self.llm = task, model, model
        self.tokenizer = model.get_tokenizer()
        self.generation_config = _model_generation_config(model.args.model, self.tokenizer)
        self._batch_size, self._num_workers = batch_size, num_workers
        unknown_engine = ENGINE_KWARGS & kwargs.keys()
        if unknown_engine:
            raise ValueError(f"{sorted(unknown_engine)} configure the engine: pass them with a model name/path, "
                             "or give them to LLM(...) before wrapping it")
        for key in ("assistant_model", "assistant_tokenizer"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}: assisted (speculative) generation is not supported by paged_backend")
            kwargs.pop(key, None)
        self.assistant_model = self.assistant_tokenizer = None
        self._generate_kwargs = {k: kwargs.pop(k) for k in (GENERATION_KEYS | {"generation_config"}) & kwargs.keys()}
        pad = self.tokenizer.pad_token_id
        self._generation_defaults = dict(PIPELINE_DEFAULTS, **({"pad_token_id": pad} if pad is not None else {}))
        self._preprocess_params, self._forward_params, self._postprocess_params = {}, {}, {}  # read by _call_params
        self._preprocess_params, self._forward_params, self._postprocess_params = self._call_params(kwargs)[:3]

    def __repr__(self):
        return f"{type(self).__name__}(model={self.llm.args.model_name!r}, task={self.task!r})"

    # ---- calling --------------------------------------------------------------------------------
    def __call__(self, text_inputs, *args, num_workers=None, batch_size=None, **kwargs):
        if args:
            raise TypeError(f"unexpected positional arguments {args!r}: pass generation options as keywords")
        params = self._call_params(kwargs)
        if isinstance(text_inputs, str):
            return self._run([text_inputs], params)[0]
        if isinstance(text_inputs, (list, tuple)):
            if not text_inputs:
                return []
            if is_valid_message(text_inputs[0]):
                return self._run([Chat(text_inputs)], params)[0]
            if isinstance(text_inputs[0], (list, tuple)) and all(c and is_valid_message(c[0]) for c in text_inputs):
                return self._run([Chat(c) for c in text_inputs], params)
            return self._run(list(text_inputs), params)
        if isinstance(text_inputs, (types.GeneratorType, Iterable)) and not isinstance(text_inputs, (dict, bytes)):
            return self._stream(iter(text_inputs), params, batch_size or self._batch_size)
        raise TypeError(f"text_inputs must be a str, a chat, or a list/iterable of them; got {type(text_inputs).__name__}")

    def predict(self, X):
        return self(X)

    transform = predict

    def _stream(self, it: Iterator, params: tuple, batch_size: Optional[int]) -> Iterator:
        """Datasets and generators: outputs come lazily, a chunk of inputs at a time (chunks of at least 64
        so that the engine still batches)."""
        chunk_size = max(64, batch_size or 1)
        while True:
            chunk = []
            for x in it:
                if isinstance(x, (list, tuple)) and x and is_valid_message(x[0]):
                    x = Chat(x)
                elif isinstance(x, dict) and is_valid_message(x):
                    raise ValueError("a stream of messages is read as one chat by transformers; pass a list of chats")
                chunk.append(x)
                if len(chunk) == chunk_size:
                    break
            if not chunk:
                return
            yield from self._run(chunk, params)

    def _call_params(self, kwargs: dict) -> tuple[dict, dict, dict, int]:
        """transformers' own split of a call's keywords into preprocess / generate / postprocess parameters,
        over the init-time ones; and the prefix's length in tokens (0 without a prefix)."""
        kwargs = dict(kwargs)
        kwargs.pop("tokenizer", None)  # transformers passes its tokenizer along for stop_strings
        pre, fwd, post = self._sanitize_parameters(**kwargs)
        pre = {**self._preprocess_params, **pre}
        fwd = {**self._forward_params, **fwd}
        post = {**self._postprocess_params, **post}
        fwd.pop("tokenizer", None)  # added for stop_strings: the engine matches stop strings itself
        prefix_len = fwd.pop("prefix_length", 0) if pre.get("prefix") else 0
        bad = [k for k in fwd if k not in GENERATION_KEYS and k not in ("generation_config", "streamer")]
        if bad:
            raise ValueError(f"unsupported argument(s) {bad}: paged_backend's pipeline takes the generation "
                             "parameters of transformers' GenerationConfig and TextGenerationPipeline's own")
        return pre, fwd, post, prefix_len

    # ---- one call -------------------------------------------------------------------------------
    def _run(self, inputs: list, params: tuple) -> list:
        pre, fwd, post, prefix_len = params
        if fwd.get("streamer") is not None:
            return self._run_streamed(inputs, params)
        fwd.pop("streamer", None)
        resolved = self._resolve_generation(fwd)
        encodings, prompts, sps = [], [], []
        for x in inputs:
            enc, ids = self._encode(x, pre, resolved)
            encodings.append(enc)
            prompts.append(ids)
            sps.append(self._sampling_params(resolved, len(ids), prefix_len if isinstance(x, str) else 0))
        outs = self.llm.generate(prompts, sps, use_tqdm=False) if prompts else []
        return [self.postprocess(self._model_outputs(enc, ids, out, resolved), **post)
                for enc, ids, out in zip(encodings, prompts, outs)]

    def _run_streamed(self, inputs: list, params: tuple) -> list:
        """streamer=: as generate() feeds it, one prompt at a time: the prompt's ids, then each step's new
        tokens as the engine makes them, then end() — also after an error, so a reader never waits forever."""
        pre, fwd, post, prefix_len = params
        fwd = dict(fwd)
        streamer = fwd.pop("streamer")
        if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            raise TypeError(f"streamer must have put() and end() (a transformers TextStreamer, TextIteratorStreamer "
                            f"or BaseStreamer); got {type(streamer).__name__}")
        results = []
        for x in inputs:
            try:
                resolved = self._resolve_generation(fwd)
                enc, ids = self._encode(x, pre, resolved)
                sp = self._sampling_params(resolved, len(ids), prefix_len if isinstance(x, str) else 0)
                if sp.n != 1:
                    raise ValueError("streamer= streams one sequence at a time: num_return_sequences must be 1")
                streamer.put(torch.tensor([ids]))
                for out in self.llm.generate_stream(ids, sp):
                    if out.outputs[0].token_ids_delta:
                        streamer.put(torch.tensor(out.outputs[0].token_ids_delta))
            finally:
                streamer.end()
            results.append(self.postprocess(self._model_outputs(enc, ids, out, resolved), **post))
        return results

    def _encode(self, x, pre: dict, resolved: dict) -> tuple[dict, list[int]]:
        """TextGenerationPipeline.preprocess, and the prompt's token ids for the engine."""
        if not isinstance(x, (str, Chat)):
            raise TypeError(f"each input must be a str or a chat (a list of role/content dicts); got {type(x).__name__}")
        enc = self.preprocess(x, **pre)
        mask = enc.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("the prompt came out padded (padding='max_length'?): the engine batches unpadded "
                             "prompts, so drop `padding`")
        ids = enc["input_ids"][0].tolist()
        if ids:
            return enc, ids
        # generate() starts an empty prompt from BOS; postprocess then decodes from position 0
        bos = resolved.get("bos_token_id")
        if bos is None:
            raise ValueError("empty prompt and the model has no bos_token_id to start from")
        return {**enc, "input_ids": None}, [bos]

    @staticmethod
    def _model_outputs(enc: dict, prompt_ids: list[int], out, resolved: dict) -> dict:
        """What TextGenerationPipeline._forward hands to postprocess: the sequences of one prompt, padded to one
        length with pad_token_id as generate() pads them."""
        seqs = [prompt_ids + list(c.token_ids) for c in out.outputs]
        width = max(len(s) for s in seqs)
        pad = resolved.get("pad_token_id")
        padded = [s + [pad] * (width - len(s)) for s in seqs]
        return {"generated_sequence": torch.tensor([padded]), "input_ids": enc["input_ids"],
                "prompt_text": enc["prompt_text"]}

    def _get_set_generation_params(self, generate_kwargs: dict) -> dict:
        """transformers' rule (used by preprocess for "hole"), with the engine model's generation config."""
        params = self.generation_config.to_diff_dict()
        if (user_config := generate_kwargs.get("generation_config")) is not None:
            params.update(user_config.to_diff_dict())
        return {**params, **generate_kwargs}

    def _resolve_generation(self, gen: dict) -> dict:
        """The generation parameters generate() would run with: the call's kwargs over its generation_config over
        the model's generation config over generate()'s global defaults, plus the pipeline's defaults where
        none of them is set (the sampling ones only when sampling)."""
        if "generation_config" not in gen:  # as transformers: a call's generation_config replaces init's kwargs
            gen = {**self._generate_kwargs, **gen}
        gen = dict(gen)
        user_cfg = gen.pop("generation_config", None)
        if user_cfg is not None and not isinstance(user_cfg, GenerationConfig):
            raise TypeError(f"generation_config must be a transformers.GenerationConfig, got {type(user_cfg).__name__}")
        model_set = _set_fields(self.generation_config)
        user_set = _set_fields(user_cfg) if user_cfg is not None else {}
        set_params = {**model_set, **user_set, **gen}
        added = {k: v for k, v in self._generation_defaults.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in SAMPLING_ONLY}
        defaults = GenerationConfig._get_default_generation_params()
        resolved = {**defaults, **model_set, **user_set, **{k: v for k, v in gen.items() if v is not None}, **added}
        for key, value in resolved.items():
            if key in HANDLED or key in NO_OUTPUT_EFFECT or key.startswith("_"):
                continue
            default = defaults.get(key)
            if value != default and not (default is None and value in (None, False, [], {})):
                raise ValueError(f"generation parameter {key}={value!r} is not supported by paged_backend's engine "
                                 "(greedy or sampled decoding with temperature/top-k/top-p/min-p and "
                                 "repetition_penalty only); drop it or use transformers' own pipeline")
        if resolved["do_sample"] and resolved.get("temperature") is not None and resolved["temperature"] <= 0:
            raise ValueError(f"`temperature` (={resolved['temperature']}) has to be a strictly positive float when "
                             "do_sample=True; use do_sample=False for greedy decoding")
        if not resolved["do_sample"] and (resolved["num_return_sequences"] or 1) > 1:
            raise ValueError("Greedy methods without beam search do not support `num_return_sequences` different "
                             f"than 1 (got {resolved['num_return_sequences']}); set do_sample=True")
        eos = resolved.get("eos_token_id")
        resolved["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if resolved.get("pad_token_id") is None and resolved["eos_token_id"]:
            resolved["pad_token_id"] = resolved["eos_token_id"][0]  # generate() does the same
        return resolved

    def _sampling_params(self, r: dict, prompt_len: int, prefix_len: int) -> SamplingParams:
        if r.get("max_new_tokens") is not None:
            max_tokens = r["max_new_tokens"]
        else:  # a total length; with a prefix it does not count the prefix (TextGenerationPipeline._forward)
            max_tokens = max(1, r["max_length"] + prefix_len - prompt_len)
        if r.get("min_new_tokens") is not None:
            min_tokens = r["min_new_tokens"]
        else:
            min_tokens = max(0, (r.get("min_length") or 0) + (prefix_len if r.get("min_length") else 0) - prompt_len)
        sp: dict[str, Any] = dict(
            n=r["num_return_sequences"] or 1,
            max_tokens=max_tokens,
            min_tokens=min(min_tokens, max_tokens),
            repetition_penalty=r["repetition_penalty"],
            # generate() stops on the generation config's eos ids only, and keeps the eos token in the sequence
            ignore_eos=True,
            stop_token_ids=r["eos_token_id"] or None,
            stop=r.get("stop_strings") or None,
            include_stop_str_in_output=True,
            skip_special_tokens=True,
        )
        if r["do_sample"]:
            top_k = r.get("top_k")
            sp.update(temperature=r["temperature"], top_p=r["top_p"], top_k=-1 if not top_k else top_k,
                      min_p=r.get("min_p") or 0.0,
                      # drawn from torch's global generator, so torch.manual_seed / set_seed make calls repeatable
                      seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        else:
            sp.update(temperature=0.0)
        return SamplingParams(**sp)

def _set_fields(cfg: GenerationConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items()
            if v is not None and not k.startswith("_") and k != "transformers_version" and k in GENERATION_KEYS}


def _is_model_object(model) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model, "base_model")


def _llm_of_model_object(model, tokenizer, device, dtype, engine_kwargs: dict) -> LLM:
    """An engine around a loaded transformers model, run in place (its device and dtype: transformers'
    pipeline would move the model to `device`; the engine uses it where it is, so a different one is refused)."""
    if tokenizer is None:
        raise ValueError("pass tokenizer= with a model object (a tokenizer object or its name/path)")
    if dtype not in (None, "auto"):
        engine_kwargs = {**engine_kwargs, "dtype": _engine_dtype(dtype)}
    return LLM(model, tokenizer=tokenizer, device=_engine_device(device), **engine_kwargs)


def _model_generation_config(model, tokenizer) -> GenerationConfig:
    """What transformers sets as model.generation_config: generation_config.json if there is one, else one
    made from config.json. For a .gguf file or an alias (no config.json) the tokenizer's special tokens.
    A model object has its own."""
    if _is_model_object(model) and getattr(model, "generation_config", None) is not None:
        return copy.deepcopy(model.generation_config)
    path = os.path.expanduser(str(model))
    for loader in (lambda: GenerationConfig.from_pretrained(path, local_files_only=True),
                   lambda: GenerationConfig.from_model_config(AutoConfig.from_pretrained(path, local_files_only=True))):
        if os.path.isfile(path):
            break
        try:
            return loader()
        except Exception:  # not an HF directory or cached hub id (alias, hub id not cached): next source
            continue
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


def _engine_device(device) -> str:
    """transformers' device argument (int, str, torch.device) as the engine's device string."""
    if device is None:
        return "auto"
    if isinstance(device, torch.device):
        return str(device)
    if isinstance(device, int):
        return "cpu" if device < 0 else f"cuda:{device}"
    return str(device)


def _engine_dtype(dtype) -> str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return str(dtype)


class _PendingModel:
    """A model name/path and its engine options, built into an LLM once the pipeline knows the device."""

    def __init__(self, model: str, engine_kwargs: dict):
        self.model, self.engine_kwargs = model, engine_kwargs

    def build(self, device=None, dtype=None, tokenizer=None) -> LLM:
        kw = dict(self.engine_kwargs)
        if tokenizer is not None:
            kw["tokenizer"] = tokenizer
        if dtype is not None:
            kw["dtype"] = _engine_dtype(dtype)
        return LLM(self.model, device=_engine_device(device), **kw)


class PagedLLMLoader:
    """Stands where transformers.pipeline() expects a model class: its from_pretrained() loads no weights."""

    @classmethod
    def from_pretrained(cls, model, dtype=None, revision=None, device_map=None, trust_remote_code=None,
                        _from_pipeline=None, token=None, local_files_only=None, code_revision=None, **engine_kwargs):
        if revision not in (None, "main") or code_revision is not None:
            raise ValueError("revisions are not supported: pass a local directory or a cached hub id")
        if trust_remote_code:
            raise ValueError("paged_backend never runs a model's remote code: drop trust_remote_code")
        if device_map not in (None, "auto", "cpu", "cuda"):
            raise ValueError(f"device_map={device_map!r}: the engine runs on one device; pass device= instead")
        unknown = engine_kwargs.keys() - ENGINE_KWARGS
        if unknown:
            raise ValueError(f"unsupported model_kwargs {sorted(unknown)}; the engine takes {sorted(ENGINE_KWARGS)}")
        if dtype is not None:
            engine_kwargs["dtype"] = _engine_dtype(dtype)
        return _PendingModel(str(model), engine_kwargs)


def pipeline(task: Optional[str] = TASK, model=None, config=None, tokenizer=None, device=None, device_map=None,
             dtype="auto", torch_dtype=None, model_kwargs: Optional[dict] = None, trust_remote_code=None,
             revision=None, use_fast=True, token=None, **kwargs) -> PagedTextGenerationPipeline:
    """transformers.pipeline for text generation: `model` a bundled alias, HF directory or hub id, .gguf file,
    an existing `LLM`, or a loaded transformers model object (with tokenizer=; run in place). Engine options
    (max_model_len, kv_cache_memory, ...) may be given here or in model_kwargs; the other keywords are the
    pipeline's call defaults, as in transformers."""
    if task not in (TASK, REGISTERED_TASK):
        raise ValueError(f"paged_backend's pipeline serves task {TASK!r} only, not {task!r}")
    if model is None:
        raise ValueError("pass model=<alias, directory, hub id, .gguf file or LLM>: there is no default model")
    if config is not None:
        raise ValueError("config= is not supported: the engine reads the model's own config")
    if not use_fast:
        raise ValueError("use_fast=False is not supported: the engine uses the model's fast tokenizer")
    engine_kwargs = dict(model_kwargs or {})
    engine_kwargs.update({k: kwargs.pop(k) for k in ENGINE_KWARGS & kwargs.keys() if k != "tokenizer"})
    dtype = torch_dtype if torch_dtype is not None and dtype == "auto" else dtype
    if isinstance(model, LLM):
        if engine_kwargs or dtype not in (None, "auto") or device is not None:
            raise ValueError("model is an existing LLM: its engine options, dtype and device are already fixed")
        return PagedTextGenerationPipeline(model, tokenizer=tokenizer, task=TASK, **kwargs)
    if _is_model_object(model):
        return PagedTextGenerationPipeline(_llm_of_model_object(model, tokenizer, device, dtype, engine_kwargs),
                                           task=TASK, **kwargs)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name/path, a paged_backend.LLM or a loaded transformers model; "
                        f"got {type(model).__name__}")
    pending = PagedLLMLoader.from_pretrained(os.fspath(model), dtype=dtype, revision=revision, device_map=device_map,
                                             trust_remote_code=trust_remote_code, token=token, **engine_kwargs)
    return PagedTextGenerationPipeline(pending, tokenizer=tokenizer, task=TASK, device=device, **kwargs)


PIPELINE_REGISTRY.register_pipeline(REGISTERED_TASK, pipeline_class=PagedTextGenerationPipeline,
                                    pt_model=PagedLLMLoader, type="text")
