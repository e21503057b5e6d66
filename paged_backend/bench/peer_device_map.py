"""Peer `hf-device-map`: what a transformers user does with a model too large for one GPU —
`device_map="auto"`: consecutive decoder layers on consecutive GPUs (one GPU busy at a time),
`generate` in static padded batches.

Built here without accelerate (not installed on every GPU machine) and without writing 100+ GB of
dummy weights to disk: the model is created on the meta device, each part materialized on its GPU
with random weights, and a pre-hook moves a layer's inputs to its GPU, as accelerate's hooks do.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from paged_backend.bench.workload import Request

_PAD = 2


def _to_device_hook(device: torch.device):
    def move(module, args, kwargs):
        def mv(x):
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, tuple):
                return tuple(mv(v) for v in x)
            return x

        return tuple(mv(a) for a in args), {k: mv(v) for k, v in kwargs.items()}

    return move


def _materialize(part: torch.nn.Module, device: torch.device, gen: torch.Generator) -> None:
    """Random weights on the device, like load_format="dummy": norms 1 ± 1e-3, the rest ±1e-3."""
    part.to_empty(device=device)
    with torch.no_grad():
        for name, p in part.named_parameters():
            p.uniform_(-1e-3, 1e-3, generator=gen)
            if "norm" in name:
                p.add_(1.0)


def load_split(model_dir: Path, dtype: torch.dtype, num_gpus: int):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    layers = model.model.layers
    first, last = torch.device("cuda", 0), torch.device("cuda", num_gpus - 1)
    gens = {i: torch.Generator(device=f"cuda:{i}").manual_seed(0) for i in range(num_gpus)}
    for k, layer in enumerate(layers):
        dev = torch.device("cuda", k * num_gpus // len(layers))
        _materialize(layer, dev, gens[dev.index])
        layer.register_forward_pre_hook(_to_device_hook(dev), with_kwargs=True)
    _materialize(model.model.embed_tokens, first, gens[0])
    for part in (model.model.norm, model.lm_head):
        _materialize(part, last, gens[num_gpus - 1])
        part.register_forward_pre_hook(_to_device_hook(last), with_kwargs=True)
    if getattr(cfg, "tie_word_embeddings", False):
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().to(last))
    # generate() appends the sampled ids to input ids on the first GPU: logits go back there.
    model.lm_head.register_forward_hook(lambda module, args, out: out.to(first))
    # Rotary buffers are computed at construction: rebuild them for real on the first GPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg, device=first)
    return model.eval()


def hf_device_map(model_dir: Path, requests: list[Request], dtype: torch.dtype, num_gpus: int,
                  batch_size: int = 64) -> dict:
    model = load_split(model_dir, dtype, num_gpus)
    dev = torch.device("cuda", 0)

    def run(batch: list[Request]) -> int:
        width = max(len(r.prompt) for r in batch)
        ids = torch.tensor([[_PAD] * (width - len(r.prompt)) + r.prompt for r in batch], device=dev)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=dev)
        new = max(r.output_len for r in batch)
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=_PAD)
        return sum(r.output_len for r in batch)

    def sync() -> None:
        for i in range(num_gpus):
            torch.cuda.synchronize(i)

    with torch.no_grad():
        run([Request(requests[0].prompt[:8], 4)])  # warm-up
        sync()
        t0 = time.perf_counter()
        out_tokens = 0
        for i in range(0, len(requests), batch_size):
            out_tokens += run(requests[i : i + batch_size])
            print(f"  hf-device-map: {min(i + batch_size, len(requests))}/{len(requests)} requests "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        sync()
        seconds = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return dict(name=f"hf-device-map (transformers generate, device_map over {num_gpus} GPUs, "
                     f"static batches of {batch_size})",
                seconds=seconds, output_tokens=out_tokens, peer="hf-device-map", requests=len(requests))
