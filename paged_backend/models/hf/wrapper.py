"""Any transformers causal LM as an engine model: transformers' own modeling code runs every layer,
our paged attention (registered through `AttentionInterface`) runs attention.

The wrapper offers the runner what the native models offer — `forward(ids, positions, meta)` ->
hidden states, `compute_logits(hidden)`, `attention_layers()` to bind the KV caches — so the
scheduler, prefix caching, chunked prefill, preemption, sampling and CUDA graphs work unchanged.
The transformers model is used as it is (no copy of its weights) and is left as it was between
engine steps: the attention implementation is switched to ours only while the engine's forward
runs, then switched back, so a model object the user passed in still works on its own.
"""

from __future__ import annotations

import copy
import types
from contextlib import contextmanager

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from paged_backend.layers.attention import Attention, AttentionMetadata
from paged_backend.models.blocks import layer_types_of
from paged_backend.models.hf import falcon
from paged_backend.models.hf.attention import IMPLEMENTATION, PagedStep, active_step


class _Outputs(BaseModelOutputWithPast):
    """The base model's outputs as the head reads them; extras it may look at (a MoE's router
    logits, ...) are absent, as when they were not asked for."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return None


class _HiddenStates(nn.Module):
    """Stands in for the base model inside the head view: it returns the hidden states it is given.
    It also stands in for the base model's submodules (OPT's head calls `self.model.decoder`)."""

    def forward(self, *args, inputs_embeds=None, **kwargs):
        return _Outputs(last_hidden_state=inputs_embeds)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return self


class TransformersCausalLM(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if hf_model.training:
            raise ValueError("the transformers model is in training mode (dropout on): call model.eval() first")
        falcon.check(hf_model.config)
        self.hf = hf_model
        self.config = hf_model.config
        self._configs = list({id(c): c for c in _configs_of(hf_model)}.values())
        self._overrides = falcon.attention_overrides(hf_model)
        # The CausalLM's own head (lm_head, logit scaling, final soft-capping, ...) applied to given
        # hidden states: a shallow copy whose base model is replaced by _HiddenStates. Not a submodule.
        head = copy.copy(hf_model)
        head._modules = dict(hf_model._modules)
        head._modules[hf_model.base_model_prefix] = _HiddenStates()
        self.__dict__["_head"] = head
        self._step = PagedStep()
        specs = self._probe()
        # One cache geometry for all layers: the largest head size and KV head count (see PagedStep.attend).
        kv_heads, head_dim = max(s.num_kv_heads for _, s in specs), max(s.head_dim for _, s in specs)
        self.attn = nn.ModuleList(
            Attention(s.num_heads, kv_heads, head_dim, s.scale, s.sliding_window, s.softcap) for _, s in specs
        )
        self._step.layers = {id(module): layer for (module, _), layer in zip(specs, self.attn)}

    @contextmanager
    def _engaged(self):
        """Our attention implementation and Falcon-style overrides in place for one forward pass."""
        saved = [c._attn_implementation_internal for c in self._configs]
        for c in self._configs:
            c._attn_implementation_internal = IMPLEMENTATION  # also: transformers builds no mask for it
        own = {m: m.__dict__.get("forward") for m in self._overrides}  # e.g. an offloading hook's
        for module, fn in self._overrides.items():
            module.forward = types.MethodType(fn, module)
        try:
            with active_step(self._step):
                yield
        finally:
            for module, forward in own.items():
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward
            for c, impl in zip(self._configs, saved):
                c._attn_implementation_internal = impl

    def _run_base_model(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self._engaged():
            out = self.hf.base_model(input_ids=ids[None], position_ids=positions[None], use_cache=False)
        return out[0][0]

    @torch.inference_mode()
    def _probe(self):
        """One forward pass of two tokens that records every attention call: its module, heads, head
        size, scale, window and soft-cap (transformers passes them to the attention function)."""
        device = next(self.hf.parameters()).device
        ids, positions = torch.tensor([3, 4], device=device), torch.arange(2, device=device)
        self._step.probed = []
        try:
            hidden = self._run_base_model(ids, positions)
            probed = self._step.probed
            self._step.probed = []
            with self._engaged():  # the whole CausalLM on the same inputs: what the head view must give
                expected = self.hf(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
        finally:
            self._step.probed = None
        arch = type(self.hf).__name__
        # Two forward passes: equal up to rounding in the model's dtype (e.g. MoE sums in another order).
        tol = max(1e-3, 4 * torch.finfo(expected.dtype).eps)
        if not torch.allclose(self.compute_logits(hidden).float(), expected.float(), rtol=tol, atol=tol):
            raise NotImplementedError(f"{arch}'s output head could not be run apart from its base model")
        if not probed:
            raise NotImplementedError(f"{arch} made no attention call (recurrent/state-space layers only?)")
        if len({id(m) for m, _ in probed}) != len(probed):
            raise NotImplementedError(f"{arch} calls one attention module more than once per forward pass")
        # Some architectures window their sliding layers through the mask only (Qwen2-MoE, PhiMoE) and
        # do not pass the window to the attention function: the config says which layers slide.
        layer_types = layer_types_of(self.config)
        for i, (_, spec) in enumerate(probed):
            if spec.sliding_window is None and i < len(layer_types) and layer_types[i] == "sliding_attention":
                spec.sliding_window = self.config.sliding_window
        kv_heads = max(s.num_kv_heads for _, s in probed)
        if any(kv_heads % s.num_kv_heads or s.num_heads % kv_heads for _, s in probed):
            raise NotImplementedError(
                f"{arch}'s layers have KV head counts {sorted({s.num_kv_heads for _, s in probed})} that do not "
                "divide each other and their query heads; the KV cache has one geometry"
            )
        return probed

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[T] token ids and positions of the step's packed batch -> hidden states [T, hidden]."""
        self._step.meta = meta
        try:
            return self._run_base_model(input_ids, positions)
        finally:
            self._step.meta = None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab], through the CausalLM's own head (in its dtype)."""
        return self._head(inputs_embeds=hidden[None], use_cache=False, logits_to_keep=0).logits[0]

    def attention_layers(self) -> list[Attention]:
        return list(self.attn)

    def kv_cache_shape_info(self) -> tuple[int, int, int]:
        """(num attention layers, KV heads, head size) of the paged cache."""
        return len(self.attn), self.attn[0].num_kv_heads, self.attn[0].head_dim


def _configs_of(model: nn.Module):
    """Every config object the modules read `_attn_implementation` from (usually one, shared)."""
    yield model.config
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            yield cfg
