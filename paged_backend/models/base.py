"""What every native causal LM shares: the runner-facing methods and loading HF checkpoint tensors."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from paged_backend.layers.attention import Attention
from paged_backend.layers.linear import MergedLinear
from paged_backend.layers.parallel import materialize

# HF projection name -> (our fused module, shard): q/k/v and gate/up are stacked at load time.
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}
_MAX_LISTED = 20


def _listing(names) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


class CausalLM(nn.Module):
    """Base of the native models. Subclasses set `self.model` (with `embed_tokens` and `layers`),
    `self.lm_head` and `self.config`, and implement `forward`."""

    # Subclasses may map a checkpoint name to ours (e.g. strip a multimodal wrapper's prefix); None drops it.
    def rename_checkpoint_tensor(self, name: str) -> str | None:
        return name

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, vocab] in the model's dtype (under tensor parallelism: on
        rank 0, gathered from every rank's vocab range; None on the other ranks). The sampler widens
        them to fp32 where it needs to; its greedy path reads them as they are (a bf16 model's
        [256, 128256] logits are 65 MB, and widening them cost more than choosing the tokens)."""
        return self.lm_head.gather(self.lm_head(hidden))

    def attention_layers(self) -> list[Attention]:
        """The paged-attention layer of each decoder layer, in layer order (the runner binds kv_cache)."""
        return [m for m in self.modules() if isinstance(m, Attention)]

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight is self.model.embed_tokens.weight

    def tie_embeddings(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors (as `save_pretrained` writes them) into this model.

        q/k/v and gate/up are fused while loading; rotary buffers are ignored; lm_head is tied to the
        embeddings when the config says so or the checkpoint has none. Tensors may be lazy file
        slices (`.shape`, `.narrow`): tensor-parallel layers read only this rank's part of them. Raises ValueError naming every
        missing and unexpected tensor. Returns the names of this model's parameters that were filled.
        """
        params = dict(self.named_parameters())
        expected: set[tuple[str, str | None]] = set()
        for module_name, module in self.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{pname}" if module_name else pname
                if full not in params:
                    continue  # a tied alias
                if isinstance(module, MergedLinear):
                    expected.update((full, shard) for shard in module.shard_sizes)
                else:
                    expected.add((full, None))

        loaded: set[tuple[str, str | None]] = set()
        unexpected: list[str] = []
        for ckpt_name, tensor in weights:
            if "rotary_emb." in ckpt_name:
                continue  # inv_freq and friends are recomputed from the config
            name = self.rename_checkpoint_tensor(ckpt_name)
            if name is None:
                continue
            if name == "lm_head.weight" and self.tied_embeddings:
                continue  # tied: the embedding is the source of truth, as in transformers
            module_path, _, pname = name.rpartition(".")
            parent, _, proj = module_path.rpartition(".")
            if proj in _STACKED:
                fused, shard = _STACKED[proj]
                target = f"{parent}.{fused}"
                if f"{target}.{pname}" in params:
                    self.get_submodule(target).load_shard(pname, shard, tensor)
                    loaded.add((f"{target}.{pname}", shard))
                    continue
            if name in params:
                param = params[name]
                shard_of = getattr(self.get_submodule(module_path), "shard_of", None)
                tensor = shard_of(pname, tensor) if shard_of is not None else materialize(tensor)
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                        f"but the model expects {tuple(param.shape)} (does config.json match the weights?)"
                    )
                param.data.copy_(tensor)
                loaded.add((name, None))
                continue
            unexpected.append(ckpt_name)

        missing = expected - loaded
        if ("lm_head.weight", None) in missing and ("model.embed_tokens.weight", None) in loaded:
            self.tie_embeddings()  # no lm_head in the checkpoint: share the embedding matrix
            missing.discard(("lm_head.weight", None))
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(
                    "missing tensors: "
                    + _listing(f"{name} (the {shard} part)" if shard else name for name, shard in missing)
                )
            if unexpected:
                problems.append("unexpected tensors: " + _listing(unexpected))
            raise ValueError(
                f"checkpoint does not match {type(self).__name__} for this config: "
                + "; ".join(problems)
                + ". Check that the weights and config.json come from the same model."
            )
        return {name for name, _ in loaded} | ({"lm_head.weight"} if self.tied_embeddings else set())


def sliding_window_for(config, layer_type: str) -> int | None:
    """The window passed to the kernel for a layer. transformers masks key j for query i unless
    i - window < j <= i, which is exactly the kernel's convention, so the value passes through unchanged."""
    if layer_type != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)

