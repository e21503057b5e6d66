"""From EngineArgs to the parts the engine runs: device, dtype, model with weights, tokenizer,
the KV cache sized to the memory budget, and the model runner bound to it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from paged_backend.args import EngineArgs
from paged_backend.layers.quant import quantize_linears_fp8, weight_bytes
from paged_backend.loader import ModelLoadError, init_dummy_weights, iter_weights, load_tokenizer, resolve_model
from paged_backend.loader.quantization import KV_SCALE_SUFFIXES
from paged_backend.loader.tokenizer import dir_tokenizer
from paged_backend.models.registry import get_model_class, kv_cache_shape_info, resolve_impl
from paged_backend.runtime.kv_cache import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    KVCacheSpec,
    check_fits,
    cuda_kv_budget,
    num_blocks_for_bytes,
)
from paged_backend.runtime.model_runner import ModelRunner

logger = logging.getLogger("paged_backend")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineSetup:
    device: torch.device
    dtype: torch.dtype
    hf_config: object
    tokenizer: object
    max_model_len: int
    max_num_batched_tokens: int
    vocab_size: int
    eos_token_ids: set[int]
    num_blocks: int
    runner: ModelRunner
    quantization: str | None  # "fp8" or None
    kv_cache_dtype: str  # "bfloat16", "float8_e4m3fn", ...
    weight_bytes: int  # parameters as stored (fp8 weights one byte each)
    kv_bytes_per_token: int  # K and V of one token over all layers


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use device='cpu'")
    return dev


def resolve_dtype(dtype: str, device: torch.device, hf_config) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # exact and, without AMX, as fast as bf16 on most CPUs
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = _DTYPES.get(cfg_dtype)
    return cfg_dtype if cfg_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def eos_ids(source, tokenizer) -> set[int]:
    """What ends a generation: the checkpoint's (generation config and config, as the loader
    merged them) and the tokenizer's EOS."""
    ids = {int(t) for t in (source.eos_token_ids or [])}
    v = getattr(source.hf_config, "eos_token_id", None)
    ids.update([v] if isinstance(v, int) else list(v or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _split_kv_scales(weights, scales: dict[tuple[int, str], float]):
    """Pass model tensors through; keep an FP8 checkpoint's per-layer KV-cache scales
    (`model.layers.{i}.self_attn.k_scale` / `v_scale`) in `scales` instead."""
    for name, t in weights:
        parts = name.split(".")
        if parts[-1] in KV_SCALE_SUFFIXES and "layers" in parts:
            scales[(int(parts[parts.index("layers") + 1]), parts[-1])] = float(t.reshape(-1)[0])
            continue
        yield name, t


def build_model(source, hf_config, dtype: torch.dtype, device: torch.device, load_format: str, seed: int,
                model_impl: str = "auto"):
    if resolve_impl(hf_config, model_impl) == "native":
        try:
            return _build_native(source, hf_config, dtype, device, load_format, seed)
        except NotImplementedError as exc:  # e.g. a rope scaling type our layers do not have
            if model_impl == "native":
                raise ModelLoadError(f"model_impl='native': {exc}") from exc
            logger.warning("native model code cannot run this config (%s); using transformers' modeling code", exc)
    from paged_backend.models.hf.build import build_transformers_model

    return build_transformers_model(source, dtype, device, load_format, seed)


def _build_native(source, hf_config, dtype: torch.dtype, device: torch.device, load_format: str, seed: int):
    cls = get_model_class(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(hf_config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        init_dummy_weights(model, seed=seed)
    else:
        kv_scales: dict[tuple[int, str], float] = {}
        weights = _split_kv_scales(iter_weights(source, dtype), kv_scales)
        model.load_weights((name, t.to(device)) for name, t in weights)
        for (layer, which), value in kv_scales.items():
            setattr(model.attention_layers()[layer], which, value)
        if kv_scales:
            logger.info("KV-cache scales from the checkpoint for %d layers", len({k[0] for k in kv_scales}))
    return model.eval()


def _tokenizer(args: EngineArgs, source):
    if args.tokenizer is not None and not isinstance(args.tokenizer, str):
        return args.tokenizer  # a tokenizer object
    if source is not None:
        return load_tokenizer(source, args.tokenizer)
    from pathlib import Path

    if args.tokenizer is not None:
        from paged_backend.loader.resolve import resolve_tokenizer_path

        return dir_tokenizer(resolve_tokenizer_path(args.tokenizer))
    where = getattr(args.model, "name_or_path", None)  # the directory from_pretrained read it from
    if not where or not Path(where).is_dir():
        raise ValueError("a model object needs its tokenizer: pass tokenizer=<a tokenizer object or name/path>")
    return dir_tokenizer(Path(where))


def _from_model_object(args: EngineArgs):
    """(model, device, dtype, eos ids) for an already-loaded transformers model, used in place."""
    from paged_backend.models.hf.build import wrap

    hf_model = args.model
    param = next(hf_model.parameters())
    device, dtype = param.device, param.dtype
    if args.dtype != "auto" and _DTYPES[args.dtype] != dtype:
        raise ValueError(f"dtype={args.dtype!r}, but the model object's weights are {dtype}; convert the model "
                         "(model.to(dtype)) or leave dtype='auto'")
    want = torch.device(args.device) if args.device != "auto" else device
    if want.type != device.type or want.index not in (None, device.index):
        raise ValueError(f"device={args.device!r}, but the model object is on {device}; move it (model.to(device)) "
                         "or leave device='auto'")
    if args.model_impl == "native":
        raise ValueError("a model object runs through transformers' modeling code: model_impl='native' needs a "
                         "name or path")
    if args.load_format != "auto":
        raise ValueError(f"load_format={args.load_format!r} does not apply to a model object (its weights are used)")
    eos: set[int] = set()
    for v in (getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None),
              getattr(hf_model.config, "eos_token_id", None)):
        eos.update([v] if isinstance(v, int) else list(v or []))
    return wrap(hf_model), device, dtype, eos


def build_engine_parts(args: EngineArgs) -> EngineSetup:
    torch.manual_seed(args.seed)
    source = model = None
    if isinstance(args.model, str):
        device = resolve_device(args.device)
        source = resolve_model(args.model, load_format=args.load_format)
        cfg = source.hf_config
        dtype = resolve_dtype(args.dtype, device, cfg)
    else:
        model, device, dtype, eos = _from_model_object(args)
        cfg = args.model.config
    tokenizer = _tokenizer(args, source)
    if source is not None:
        eos = eos_ids(source, tokenizer)
    elif tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)

    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is None:  # configs that do not say: a conservative context
        limit = 2048
    elif not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"the model config's max_position_embeddings={limit!r} is not a positive int")
    max_model_len = args.max_model_len or limit
    if max_model_len > limit:
        raise ValueError(
            f"max_model_len={max_model_len} is larger than the model's max_position_embeddings={limit}"
        )
    max_batched = args.max_num_batched_tokens or (8192 if device.type == "cuda" else 2048)

    quantization = args.quantization
    if source is not None and source.quantization == "fp8" and quantization is None:
        logger.info("%s is an FP8 checkpoint: running it with quantization='fp8'", args.model)
        quantization = "fp8"
    if model is None:
        model = build_model(source, cfg, dtype, device, args.load_format, args.seed, args.model_impl)
        if quantization == "fp8":
            n = quantize_linears_fp8(model)
            logger.info("fp8 weights: %d linear layers quantized to float8_e4m3fn (per-channel scales)", n)
    elif quantization == "fp8":  # quantizing would rewrite the caller's own model object
        raise ValueError("quantization='fp8' needs a model name or path, not a loaded model object")
    runner = ModelRunner(model, device, args.block_size)
    shape_info = getattr(model, "kv_cache_shape_info", None)  # the transformers wrapper knows it from its layers
    num_layers, num_kv_heads, head_dim = shape_info() if shape_info else kv_cache_shape_info(cfg)
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else dtype
    spec = KVCacheSpec(num_layers, num_kv_heads, head_dim, args.block_size, kv_dtype)

    if args.kv_cache_memory is not None:
        budget, where = args.kv_cache_memory, "kv_cache_memory"
    elif device.type == "cuda":
        tokens = min(max_batched, max_model_len)
        budget = cuda_kv_budget(device, args.gpu_memory_utilization, lambda: runner.profile(tokens, spec))
        where = "gpu_memory_utilization"
    else:
        budget, where = DEFAULT_CPU_KV_CACHE_BYTES, "kv_cache_memory"
    num_blocks = num_blocks_for_bytes(spec, budget)
    check_fits(spec, num_blocks, max_model_len, where)
    runner.bind_kv_caches(spec.allocate(num_blocks, device))
    if device.type == "cuda" and not args.enforce_eager:
        try:
            runner.capture_cuda_graphs(min(args.max_num_seqs, num_blocks), max_model_len)
        except Exception as exc:
            if shape_info is None:
                raise  # native models are always capturable: a failure there is a bug
            runner.graphs = None  # e.g. MoE routing in transformers' code syncs with the host
            logger.warning("decode steps run without CUDA graphs: capturing transformers' modeling code failed (%s)",
                           exc)

    vocab = getattr(cfg, "vocab_size", None) or len(tokenizer)
    return EngineSetup(
        device=device,
        dtype=dtype,
        hf_config=cfg,
        tokenizer=tokenizer,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_batched,
        vocab_size=vocab,
        eos_token_ids=eos,
        num_blocks=num_blocks,
        runner=runner,
        quantization=quantization,
        kv_cache_dtype=str(kv_dtype).removeprefix("torch."),
        weight_bytes=weight_bytes(model),
        kv_bytes_per_token=spec.bytes_per_block // spec.block_size,
    )
