"""What the benchmarks run: dummy models at real models' shapes, and the request datasets.

Workload A (DESIGN.md) is the default: 256 prompts of random token ids, input lengths U[100,1024]
(`random.Random(0)`), 256 output tokens each, greedy, ignore_eos, Llama-3.2-1B shape.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

# Real models' shapes (config fields); weights are random ("dummy").
SHAPES = {
    "llama-3.2-1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=0, eos_token_id=1, architectures=["LlamaForCausalLM"])),
    "llama-3-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
        architectures=["LlamaForCausalLM"])),
    "gemma-7b": ("GemmaConfig", dict(
        hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=16, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        architectures=["GemmaForCausalLM"])),
    # A non-native architecture at its real shape (runs through transformers' modeling code).
    "phi-3-mini": ("Phi3Config", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
        pad_token_id=32000, architectures=["Phi3ForCausalLM"])),
    "tiny": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096, bos_token_id=0,
        eos_token_id=1, architectures=["LlamaForCausalLM"])),
}


def word_level_tokenizer(vocab_size: int):
    """A real fast tokenizer whose tokens are t0..t{vocab_size-1}: any token id decodes."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1",
                                                unk_token="t2", pad_token="t2")


def make_model_dir(shape: str, path: Path) -> Path:
    """config.json at the shape, and a word-level tokenizer covering the whole vocabulary."""
    import transformers

    cls_name, fields = SHAPES[shape]
    getattr(transformers, cls_name)(**fields).save_pretrained(path)
    word_level_tokenizer(fields["vocab_size"]).save_pretrained(path)
    return path


def workload_a(num_prompts: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [rng.randint(min_len, max_len) for _ in range(num_prompts)]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


@dataclass
class Request:
    prompt: list[int]
    output_len: int


def random_dataset(num: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int,
                   seed: int = 0) -> list[Request]:
    """Random token-id prompts; input and output lengths uniform in the given ranges. With one
    fixed output length this is exactly workload A's prompt set."""
    prompts = workload_a(num, input_len[0], input_len[1], vocab, seed)
    rng = random.Random(seed + 1)
    return [Request(p, output_len[0] if output_len[0] == output_len[1] else rng.randint(*output_len))
            for p in prompts]


def prompt_file_dataset(path: str, tokenizer, output_len: tuple[int, int], seed: int = 0) -> list[Request]:
    """One prompt per line of a text file, tokenized by the model's tokenizer."""
    lines = [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} has no prompts (one per line)")
    rng = random.Random(seed)
    return [Request(tokenizer.encode(line), rng.randint(*output_len)) for line in lines]
