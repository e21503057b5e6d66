"""One rank's part of the engine: its shard of the model (weights read for this rank only), its KV
cache (its own KV heads) sized to the memory budget, and the model runner bound to it.

Every rank runs `build_shard` with the same `ShardSpec`; with one rank it is the whole model. The
ranks agree on the block count (the smallest rank decides), so block ids mean the same everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paged_backend import kernels
from paged_backend.args import EngineArgs
from paged_backend.layers.parallel import SINGLE, TPGroup
from paged_backend.layers.linear import use_input_major_weights
from paged_backend.layers.quant import fuse_fp8_inputs, quantize_linears_fp8
from paged_backend.loader import ModelLoadError, init_dummy_weights, iter_weight_slices, iter_weights, resolve_model
from paged_backend.loader.quantization import KV_SCALE_SUFFIXES
from paged_backend.models.registry import get_model_class, resolve_impl
from paged_backend.runtime.kv_cache import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    KVCacheSpec,
    check_fits,
    cuda_kv_budget,
    num_blocks_for_bytes,
)
from paged_backend.runtime.model_runner import ModelRunner

logger = logging.getLogger("paged_backend")


@dataclass(frozen=True)
class ShardSpec:
    """What every rank needs to build its shard, decided once on rank 0 (plain and picklable)."""

    args: EngineArgs
    dtype: torch.dtype
    device_type: str
    max_model_len: int
    max_num_batched_tokens: int
    quantization: str | None = None  # "fp8": linear weights quantized after load
    kv_dtype: torch.dtype | None = None  # the KV cache's element type (None: the model's dtype)
    hidden_size: int = 0  # sizes the all-reduce buffers of tensor parallelism (0: unknown)


def build_model(source, spec: ShardSpec, device: torch.device, tp: TPGroup = SINGLE) -> torch.nn.Module:
    """This rank's model: the native code (sharded under tensor parallelism) where it runs the config,
    else transformers' modeling code with our attention (one rank only)."""
    args = spec.args
    if resolve_impl(source.hf_config, args.model_impl) == "native":
        try:
            return _build_native(source, spec, device, tp)
        except NotImplementedError as exc:  # e.g. a rope scaling type our layers do not have
            if args.model_impl == "native" or tp.size > 1:
                raise ModelLoadError(f"the native model code cannot run this config: {exc}") from exc
            logger.warning("native model code cannot run this config (%s); using transformers' modeling code", exc)
    from paged_backend.models.hf.build import build_transformers_model

    return build_transformers_model(source, spec.dtype, device, args.load_format, args.seed)


def _build_native(source, spec: ShardSpec, device: torch.device, tp: TPGroup) -> torch.nn.Module:
    cls = get_model_class(source.hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(spec.dtype)
    try:
        with torch.device(device):
            model = cls(source.hf_config, tp)
    finally:
        torch.set_default_dtype(previous)
    if spec.args.load_format == "dummy":
        init_dummy_weights(model, seed=spec.args.seed)  # each rank fills only the parameters it holds
    elif tp.size > 1:
        model.load_weights(iter_weight_slices(source, spec.dtype))  # lazy slices: this rank's rows only
    else:
        kv_scales: dict[tuple[int, str], float] = {}
        weights = _split_kv_scales(iter_weights(source, spec.dtype), kv_scales)
        model.load_weights((name, t.to(device)) for name, t in weights)
        for (layer, which), value in kv_scales.items():
            setattr(model.attention_layers()[layer], which, value)
        if kv_scales:
            logger.info("KV-cache scales from the checkpoint for %d layers", len({k[0] for k in kv_scales}))
    return model.eval()


def _split_kv_scales(weights, scales: dict[tuple[int, str], float]):
    """Pass model tensors through; keep an FP8 checkpoint's per-layer KV-cache scales
    (`model.layers.{i}.self_attn.k_scale` / `v_scale`) in `scales` instead."""
    for name, t in weights:
        parts = name.split(".")
        if parts[-1] in KV_SCALE_SUFFIXES and "layers" in parts:
            scales[(int(parts[parts.index("layers") + 1]), parts[-1])] = float(t.reshape(-1)[0])
            continue
        yield name, t


def kv_spec_of(model, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
    """The cache geometry of this rank's attention layers (its own KV heads)."""
    shape_info = getattr(model, "kv_cache_shape_info", None)  # the transformers wrapper knows it from its layers
    if shape_info is not None:
        return KVCacheSpec(*shape_info(), block_size, dtype)
    layers = model.attention_layers()
    return KVCacheSpec(len(layers), layers[0].num_kv_heads, layers[0].head_dim, block_size, dtype)


def build_shard(
    spec: ShardSpec, source=None, tp: TPGroup = SINGLE, control=None, device: torch.device | None = None,
    model: torch.nn.Module | None = None,
) -> tuple[ModelRunner, int]:
    """(runner with its KV cache bound, number of KV blocks, the same on every rank). `model`: an
    already-built one (a wrapped transformers model object) instead of loading `spec.args.model`."""
    args = spec.args
    device = device or torch.device(spec.device_type)
    if model is None:
        source = source or resolve_model(args.model, load_format=args.load_format)
        model = build_model(source, spec, device, tp)
        if spec.quantization == "fp8":
            n, fused = quantize_linears_fp8(model), fuse_fp8_inputs(model)
            logger.info("fp8 weights: %d linear layers quantized to float8_e4m3fn (per-channel scales); "
                        "%d norms / activations quantize their output for them", n, fused)
        if device.type == "cpu":
            use_input_major_weights(model)
    if device.type == "cpu" and spec.dtype == torch.float32:
        kernels.load_cpu_kernels()  # compiled here on a machine's first run, not in the first decode step
    elif spec.quantization == "fp8":  # quantizing would rewrite the caller's own model object
        raise ValueError("quantization='fp8' needs a model name or path, not a loaded model object")
    runner = ModelRunner(model, device, args.block_size, tp)
    cache = kv_spec_of(model, args.block_size, spec.kv_dtype or spec.dtype)

    if args.kv_cache_memory is not None:
        budget, where = args.kv_cache_memory, "kv_cache_memory"
    elif device.type == "cuda":
        tokens = min(spec.max_num_batched_tokens, spec.max_model_len)
        budget = cuda_kv_budget(device, args.gpu_memory_utilization, lambda: runner.profile(tokens, cache))
        where = "gpu_memory_utilization"
    else:
        budget, where = DEFAULT_CPU_KV_CACHE_BYTES, "kv_cache_memory"
    num_blocks = num_blocks_for_bytes(cache, budget)
    if tp.size > 1:  # the smallest rank decides: every block id must exist on every rank
        count = torch.tensor([num_blocks], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=control)
        num_blocks = int(count.item())
    check_fits(cache, num_blocks, spec.max_model_len, where)
    runner.bind_kv_caches(cache.allocate(num_blocks, device))
    if device.type == "cuda":
        runner.warm_up(min(spec.max_num_batched_tokens, spec.max_model_len))
    if device.type == "cuda" and not args.enforce_eager:
        try:
            runner.capture_cuda_graphs(min(args.max_num_seqs, num_blocks), spec.max_model_len)
        except Exception as exc:
            if not hasattr(model, "kv_cache_shape_info"):
                raise  # native models are always capturable: a failure there is a bug
            runner.graphs = None  # e.g. MoE routing in transformers' code syncs with the host
            logger.warning("decode steps run without CUDA graphs: capturing transformers' modeling code failed (%s)",
                           exc)
    return runner, num_blocks
