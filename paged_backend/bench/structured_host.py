"""Host cost of constrained decoding per engine step, on any machine (the CPU included).

    python -m paged_backend.bench.structured_host --num-seqs 256 --output-len 48 [--device cuda]

One tiny model (one layer, hidden 64) with the real vocabulary size (128,256 by default, byte-level
tokenizer), so the forward pass is cheap and what the grammar costs shows: N requests decode
together, first unconstrained, then each constrained to BENCH_SCHEMA, in one engine. Prints the
median step time of each kind of run (steps where all N decode; the best of --repeats runs) and the median host time per step spent in the
grammar parts: syncing the matchers and filling the masks (before the mask is applied; the fill
runs in a worker thread while the engine post-processes the previous step, so the time from the
sync to the join includes that post-processing), applying the mask, and advancing the matchers over
the appended tokens. On the GPU the first two overlap the forward pass; only what is left over
lengthens a step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from paged_backend.bench.structured import BENCH_SCHEMA, use_byte_level_tokenizer


def _tiny_model_dir(path: Path, vocab_size: int) -> Path:
    import transformers

    transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=4096, bos_token_id=0,
        eos_token_id=1, tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)
    use_byte_level_tokenizer(path, vocab_size)
    return path


class _Timers:
    """Wraps methods so that their wall time adds up per name (restored by `undo`)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.per_step: dict[str, list[float]] = defaultdict(list)
        self._undo = []

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, fn))

    def undo(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo = []


def _run(llm, prompts: list[list[int]], output_len: int, schema, timers=None) -> list[float]:
    """Seconds of each step in which every request decodes (and the timers' share of those steps)."""
    from paged_backend import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                            structured_outputs=None if schema is None else {"json": schema})
    for p in prompts:
        engine.add_request(p, params)
    steps = []
    while engine.has_unfinished_requests():
        before = dict(timers.seconds) if timers else {}
        t0 = time.perf_counter()
        engine.step(emit_unfinished=False)
        dt = time.perf_counter() - t0
        if len(engine.scheduler.running) == len(prompts) and not engine.scheduler.waiting:
            steps.append(dt)
            if timers:
                for k, v in timers.seconds.items():
                    timers.per_step[k].append(v - before.get(k, 0.0))
    return steps


def _median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds) if seconds else float("nan")


def main(argv=None) -> dict:
    import random

    import paged_backend.runtime.sampler as sampler_mod
    from paged_backend import LLM
    from paged_backend.structured.matcher import BitmaskFiller
    from paged_backend.structured.requests import StructuredRequests

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=128256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="unconstrained and constrained runs, alternated")
    a = ap.parse_args(argv)

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = _tiny_model_dir(Path(tmp), a.vocab_size)
        llm = LLM(str(path), load_format="dummy", device=a.device, dtype="float32",
                  max_num_seqs=a.num_seqs, max_model_len=a.prompt_len + a.output_len + 16)
        prompts = [[rng.randrange(3, 259) for _ in range(a.prompt_len)] for _ in range(a.num_seqs)]
        print(f"[structured-host] {a.num_seqs} sequences x {a.output_len} tokens, vocab {a.vocab_size}, "
              f"{a.device}", flush=True)
        _run(llm, prompts[:2], 4, None)
        _run(llm, prompts[:2], 4, BENCH_SCHEMA)  # compiles the grammar (cached for the timed runs)
        timers = _Timers()
        timers.wrap(StructuredRequests, "_sync", "sync matchers")
        timers.wrap(BitmaskFiller, "fill", "fill masks (xgrammar threads)")
        timers.wrap(StructuredRequests, "bitmask", "sync + fill, overlapped with post-process")
        timers.wrap(StructuredRequests, "follow", "advance matchers (post-process)")
        timers.wrap(sampler_mod, "apply_grammar_bitmask", "apply masks")
        free, constrained = [], []
        try:  # alternated, so that a shared machine's load weighs on both alike
            for r in range(a.repeats):
                free.append(_median_ms(_run(llm, prompts, a.output_len, None)))
                constrained.append(_median_ms(_run(llm, prompts, a.output_len, BENCH_SCHEMA, timers)))
                print(f"[structured-host] run {r + 1}/{a.repeats}: unconstrained {free[-1]:.1f} ms/step, "
                      f"constrained {constrained[-1]:.1f} ms/step", flush=True)
        finally:
            timers.undo()
        llm.shutdown()

    report = dict(unconstrained_step_ms=min(free), constrained_step_ms=min(constrained),
                  grammar_ms_per_step={k: _median_ms(v) for k, v in timers.per_step.items()})
    print(f"step with all {a.num_seqs} decoding (best run's median): unconstrained "
          f"{report['unconstrained_step_ms']:.1f} ms, constrained {report['constrained_step_ms']:.1f} ms; "
          f"grammar host time per step (median):")
    for k, v in report["grammar_ms_per_step"].items():
        print(f"  {k:36s} {v:7.2f} ms/step")
    return report


if __name__ == "__main__":
    main()
