"""Decode steps with a prompt arriving every step (serving's mixed steps) against plain decode steps, 1B shape."""
import random, sys, tempfile, time
from pathlib import Path
import torch
from paged_backend import LLM, SamplingParams
from paged_backend.bench.workload import make_model_dir

d = make_model_dir("llama-3.2-1b", Path(tempfile.mkdtemp()))
llm = LLM(str(d), load_format="dummy", dtype="bfloat16", max_model_len=4096)
eng = llm.engine
rng = random.Random(0)
ids = lambda n: [rng.randrange(1000, 30000) for _ in range(n)]
for _ in range(192):
    eng.add_request(ids(rng.randint(100, 1024)), SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True))
for _ in range(40):  # all prompts in, decoding
    eng.step()

def timed(n, arrive):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n):
        if arrive:
            eng.add_request(ids(arrive), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        eng.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3

for rep in range(2):
    for arrive in (0, 512, 2048):
        print(f"rep {rep}: 192 decoding + a {arrive}-token prompt every step: {timed(60, arrive):.2f} ms a step", flush=True)
llm.shutdown()
