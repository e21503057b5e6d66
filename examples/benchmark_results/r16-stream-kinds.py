"""Decode steps of 192 streamed requests (engine.step() builds every request's output each step), by output_kind."""
import random, sys, tempfile, time
from pathlib import Path
import torch
from paged_backend import LLM, SamplingParams
from paged_backend.bench.workload import make_model_dir

kind = sys.argv[1]
d = make_model_dir("llama-3.2-1b", Path(tempfile.mkdtemp()))
llm = LLM(str(d), load_format="dummy", dtype="bfloat16", max_model_len=4096)
eng = llm.engine
rng = random.Random(0)
for _ in range(192):
    eng.add_request([rng.randrange(1000, 30000) for _ in range(rng.randint(100, 1024))],
                    SamplingParams(temperature=0, max_tokens=1300, ignore_eos=True, output_kind=kind))
marks = {}
for i in range(1300):
    eng.step()
    if i in (100, 200, 1100, 1200):
        torch.cuda.synchronize()
        marks[i] = time.perf_counter()
print(f"{kind}: decode step with 192 streams: {(marks[200] - marks[100]) * 10:.2f} ms (tokens 100-200), "
      f"{(marks[1200] - marks[1100]) * 10:.2f} ms (tokens 1100-1200)", flush=True)
llm.shutdown()
