"""From EngineArgs to the parts the engine runs: device, dtype, model with weights, tokenizer,
the KV cache sized to the memory budget, and the model runner bound to it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from paged_backend.args import EngineArgs
from paged_backend.layers.quant import weight_bytes
from paged_backend.loader import load_tokenizer, resolve_model
from paged_backend.loader.tokenizer import dir_tokenizer
from paged_backend.runtime.model_runner import ModelRunner
from paged_backend.runtime.shard import ShardSpec, build_shard
from paged_backend.runtime.tp_executor import TPExecutor, validate_tensor_parallel

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
    runner: ModelRunner | TPExecutor  # the executor runs every rank's runner; same interface
    quantization: str | None  # "fp8" or None
    kv_cache_dtype: str  # "bfloat16", "float8_e4m3fn", ...
    weight_bytes: int  # parameters as stored (fp8 weights one byte each), on rank 0
    kv_bytes_per_token: int  # K and V of one token over all layers, on rank 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use device='cpu'")
    return dev


def check_fp8_support(device: torch.device, quantization: str | None, kv_cache_dtype: str) -> None:
    """FP8 weights and an FP8 KV cache need fp8 tensor cores and conversions on a CUDA device (compute
    capability 8.9 or newer); an older GPU would fail later inside a kernel, with a message that does not
    say why. (On the CPU both run the same fp8 arithmetic in fp32.)"""
    wants = [f"{name}='fp8'" for name, value in (("quantization", quantization), ("kv_cache_dtype", kv_cache_dtype))
             if value == "fp8"]
    if not wants or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        verb = "need" if len(wants) > 1 else "needs"
        raise ValueError(
            f"{' and '.join(wants)} {verb} a GPU with fp8 support (compute capability 8.9 or newer: Ada, "
            f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}. Leave them unset to "
            f"run in {'bf16' if major >= 8 else 'fp16'}, or run them on the CPU."
        )


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
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else dtype
    check_fp8_support(device, quantization, args.kv_cache_dtype)
    spec = ShardSpec(args, dtype, device.type, max_model_len, max_batched, quantization, kv_dtype,
                     hidden_size=getattr(cfg, "hidden_size", 0) or 0)
    if args.tensor_parallel_size > 1:
        if model is not None:
            raise ValueError("tensor_parallel_size > 1 needs a model name or path (each rank loads its own shard), "
                             "not a model object")
        # Checked before any process starts; then rank 0 (this process) and its workers build
        # their shards together.
        validate_tensor_parallel(cfg, args.tensor_parallel_size, device.type, args.model_impl)
        runner = TPExecutor(spec, args.tensor_parallel_size, source)
        num_blocks = runner.num_blocks
        local = runner.runner
    else:
        runner, num_blocks = build_shard(spec, source, device=device, model=model)
        local = runner

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
        weight_bytes=weight_bytes(local.model),
        kv_bytes_per_token=sum(c[0].numel() * c.element_size() for c in local.kv_caches) // args.block_size,
    )
