"""The architecture table: which HF architectures run natively, and which model_type names them.

Plain data, imported by models/ (to pick the class) and by loader/ (a GGUF's general.architecture
becomes an HF config through it) so that neither imports the other.
"""

from __future__ import annotations

# HF architecture name -> (module under paged_backend.models, class); model_type is the fallback
# when a config has no `architectures`.
NATIVE_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "GemmaForCausalLM"),
}
# HF model_type -> its CausalLM architecture name (also what a GGUF's general.architecture maps to).
MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
