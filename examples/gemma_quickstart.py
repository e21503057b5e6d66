"""The seed's walkthrough, end to end: Gemma with a turn template, two questions, one batch.

    python examples/gemma_quickstart.py                            # gemma-3-270m on the CPU (bundled)
    python examples/gemma_quickstart.py --model google/gemma-7b-it # any Gemma checkpoint (local dir or hub cache)
"""

from __future__ import annotations

import argparse

from paged_backend import LLM, SamplingParams

TURN = "<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n"
QUESTIONS = ["best time to eat your 3 meals", "a python list with 5 football players"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()

    llm = LLM(model=a.model, max_model_len=2048, device=a.device)
    params = SamplingParams(temperature=0.1, top_p=0.95, repetition_penalty=1.2, max_tokens=a.max_tokens)
    prompts = [TURN.format(q=q) for q in QUESTIONS]
    outputs = llm.generate(prompts, params)  # the progress bar reports input/output toks/s
    for q, out in zip(QUESTIONS, outputs):
        print(f"\n### {q}\n{out.outputs[0].text.strip()}")
    s = llm.stats()
    print(f"\n[{s.total_generated_tokens} tokens generated in {s.num_steps} engine steps; "
          f"peak batch {s.max_seqs_in_step}]")
    llm.shutdown()


if __name__ == "__main__":
    main()
