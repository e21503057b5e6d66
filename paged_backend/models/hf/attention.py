"""The `paged_backend` attention function that transformers' modeling code calls through its
`AttentionInterface`: it stores the step's K/V into our paged cache and attends with our kernel.

transformers hands the function each attention module and its projected, roped heads
([1, H, T, D]: the engine's varlen batch is one packed row). What it needs beyond those — the
step's AttentionMetadata and which of our `Attention` layers (with its bound KV cache) belongs to
the module — comes from the `PagedStep` that the wrapper sets for the duration of its forward, in a
ContextVar, so that nothing is stored on the user's model and nothing depends on how each
architecture threads keyword arguments down to its attention.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from paged_backend.layers.attention import Attention, AttentionMetadata

IMPLEMENTATION = "paged_backend"

# Attention keyword arguments that change what is computed and that the kernel cannot do.
_UNSUPPORTED = {"s_aux": "attention sinks", "sinks": "attention sinks", "alibi": "ALiBi position biases"}


@dataclass
class LayerSpec:
    """What one attention call needs from the kernel, seen when the wrapper probes the model."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None
    softcap: float | None


@dataclass
class PagedStep:
    """The state of one forward pass: either probing (record each attention call's geometry) or
    running (each module's layer and the step's metadata)."""

    meta: AttentionMetadata | None = None
    layers: dict[int, Attention] = field(default_factory=dict)  # id(hf attention module) -> our layer
    probed: list[tuple[torch.nn.Module, LayerSpec]] | None = None

    def attend(self, module, query, key, value, attention_mask, kwargs) -> torch.Tensor:
        if self.probed is not None:
            self.probed.append((module, _spec(module, query, key, value, attention_mask, kwargs)))
            return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        layer = self.layers[id(module)]
        t, d = query.shape[2], query.shape[3]
        # [1, H, T, D] -> [T, H, D], the layout of our Attention layer.
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        if k.shape[1] != layer.num_kv_heads:
            # A layer with fewer KV heads than the cache holds (layers differ): each head repeated over
            # its share of the cache's heads, which keeps every query head on its own KV head.
            rep = layer.num_kv_heads // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if d != layer.head_dim:
            # A smaller head than the cache's: zero-padded, which changes no score (q.k) and leaves the
            # padded output columns zero; the scale is the layer's own.
            q, k, v = (torch.nn.functional.pad(x, (0, layer.head_dim - d)) for x in (q, k, v))
        out = layer(q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1), self.meta)
        return out.view(1, t, layer.num_heads, layer.head_dim)[..., :d]


_STEP: ContextVar[PagedStep | None] = ContextVar("paged_backend_step", default=None)


def _spec(module, query, key, value, attention_mask, kwargs) -> LayerSpec:
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{type(module).__name__} uses {what}, which the paged kernel does not have")
    if attention_mask is not None:
        raise NotImplementedError(
            f"{type(module).__name__} passes its own attention mask (e.g. a bias added to the scores), "
            "which the paged kernel cannot apply"
        )
    if key.shape[-1] != value.shape[-1] or key.shape[-1] != query.shape[-1]:
        raise NotImplementedError(
            f"{type(module).__name__} has query/key/value heads of sizes {query.shape[-1]}/{key.shape[-1]}/"
            f"{value.shape[-1]} (e.g. multi-head latent attention); the paged cache holds one head size"
        )
    if getattr(module, "is_causal", True) is False:
        raise NotImplementedError(f"{type(module).__name__} is not causal")
    if query.shape[0] != 1:
        raise RuntimeError("the engine's batch must reach attention as one packed row")
    scale = kwargs.get("scaling")
    head_dim = query.shape[-1]
    return LayerSpec(
        num_heads=query.shape[1],
        num_kv_heads=key.shape[1],
        head_dim=head_dim,
        scale=float(scale) if scale is not None else head_dim**-0.5,
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap") or None,
    )


def paged_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature -> ([1, T, H, D], no attention weights)."""
    step = _STEP.get()
    if step is None:
        raise RuntimeError(
            f"attention implementation {IMPLEMENTATION!r} runs only inside paged_backend's engine; "
            "call model.set_attn_implementation('sdpa') to use this model on its own"
        )
    kwargs.pop("dropout", None)  # the engine runs models in eval mode (checked when wrapping)
    return step.attend(module, query, key, value, attention_mask, kwargs), None


class active_step:
    """`with active_step(step):` — the attention calls inside belong to this step."""

    def __init__(self, step: PagedStep):
        self.step = step

    def __enter__(self) -> PagedStep:
        self._token = _STEP.set(self.step)
        return self.step

    def __exit__(self, *exc) -> None:
        _STEP.reset(self._token)


def current_step() -> PagedStep | None:
    return _STEP.get()


AttentionInterface.register(IMPLEMENTATION, paged_attention_forward)
