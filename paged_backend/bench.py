"""Workload A (DESIGN.md): random-token prompts, fixed output length, greedy, ignore_eos, dummy
weights at a real model's shapes; our engine and, in the same run, HF transformers `generate`.

    paged-backend bench --model llama-3.2-1b --peer hf          # on the GPU
    python -m paged_backend.bench --model tiny --num-prompts 8  # smoke test on the CPU
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

# Real models' shapes (config fields); weights are random ("dummy").
SHAPES = {
    "llama-3.2-1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=0, eos_token_id=1, architectures=["LlamaForCausalLM"])),
    "gemma-7b": ("GemmaConfig", dict(
        hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=16, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        architectures=["GemmaForCausalLM"])),
    "tiny": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096, bos_token_id=0,
        eos_token_id=1, architectures=["LlamaForCausalLM"])),
}

FLOOR_SECONDS = {"llama-3.2-1b": 1.2}  # DESIGN.md: bandwidth/compute floor of workload A on the H100


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


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ours(model_dir: Path, prompts, output_len: int, **engine_kwargs) -> dict:
    from paged_backend import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(model_dir), load_format="dummy", max_model_len=2048, **engine_kwargs)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    _sync()
    elapsed = time.perf_counter() - t0
    out_toks = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.stats()
    llm.shutdown()
    return dict(name="paged-backend", seconds=elapsed, output_tokens=out_toks, load_s=load_s,
                steps=stats.num_steps, preemptions=stats.num_preemptions)


def run_hf(model_dir: Path, prompts, output_len: int, batch_size: int = 64, dtype=torch.bfloat16) -> dict:
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    pad = 2

    def batch_generate(batch, max_new):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        y = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                           do_sample=False, pad_token_id=pad)
        return (y.shape[1] - width) * len(batch)

    with torch.no_grad():
        batch_generate(prompts[:2], 4)  # warm-up
        _sync()
        t0 = time.perf_counter()
        out_toks = sum(batch_generate(prompts[i : i + batch_size], output_len) for i in range(0, len(prompts), batch_size))
        _sync()
    elapsed = time.perf_counter() - t0
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(name=f"transformers generate (static batches of {batch_size}, sdpa)", seconds=elapsed, output_tokens=out_toks)


def run_workload(a) -> list[dict]:
    shape = a.model if a.model in SHAPES else "llama-3.2-1b"
    vocab = SHAPES[shape][1]["vocab_size"]
    prompts = workload_a(a.num_prompts, a.min_input_len, a.max_input_len, vocab)
    floor = FLOOR_SECONDS.get(shape) if (a.num_prompts, a.output_len) == (256, 256) else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nworkload A: {shape}, {a.num_prompts} prompts U[{a.min_input_len},{a.max_input_len}], "
          f"{a.output_len} output tokens, greedy, ignore_eos, dummy weights, device {device}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(shape, Path(tmp))
        kw = dict(dtype=a.dtype, device=a.device)
        if getattr(a, "kv_cache_memory", None):
            kw["kv_cache_memory"] = a.kv_cache_memory
        results.append(run_ours(model_dir, prompts, a.output_len, **kw))
        print(f"paged-backend: {results[0]['seconds']:.2f} s, {results[0]['output_tokens'] / results[0]['seconds']:.0f} "
              f"output tok/s (start-up {results[0]['load_s']:.1f} s)", flush=True)
        if getattr(a, "peer", None) == "hf":
            results.append(run_hf(model_dir, prompts, a.output_len))
    print(f"{'engine':58s} {'seconds':>8s} {'out tok/s':>10s} {'vs peer':>8s} {'floor/t':>8s}")
    peer = results[1]["seconds"] if len(results) > 1 else None
    for r in results:
        r["tok_per_s"] = r["output_tokens"] / r["seconds"]
        ratio = f"{peer / r['seconds']:.2f}x" if peer else "-"
        frac = f"{floor / r['seconds']:.1%}" if floor else "-"
        print(f"{r['name']:58s} {r['seconds']:8.2f} {r['tok_per_s']:10.0f} {ratio:>8s} {frac:>8s}")
    if getattr(a, "json", None):
        Path(a.json).write_text(json.dumps(dict(shape=shape, device=device, results=results), indent=2))
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-3.2-1b", choices=sorted(SHAPES), help="shape of the dummy model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-memory", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--min-input-len", type=int, default=100)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--peer", choices=["hf", "none"], default="none", help="also time transformers generate")
    p.add_argument("--json", default=None, help="write the results here")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    run_workload(p.parse_args(argv))


if __name__ == "__main__":
    main()
