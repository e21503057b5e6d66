"""PAGED_BACKEND_PROFILE_STEPS: off, the runner holds no profile; on, the engine's step times are
recorded (the wait for sampled tokens included) and printed as medians when the engine shuts down.
(Under tensor parallelism every rank prints its own: tests/test_tensor_parallel.py.)"""

from __future__ import annotations

from paged_backend import LLM, SamplingParams
from paged_backend.runtime.step_profile import ENV


def test_profile_is_off_by_default_and_prints_medians_when_on(tiny_model_dir, monkeypatch, capfd):
    model_dir = tiny_model_dir("llama")
    kw = dict(dtype="float32", device="cpu", max_model_len=128)
    monkeypatch.delenv(ENV, raising=False)
    with LLM(str(model_dir), **kw) as llm:
        assert llm.engine.runner.step_profile is None
    monkeypatch.setenv(ENV, "1")
    prompts = [[5 + i, 6, 7, 8] for i in range(3)]
    with LLM(str(model_dir), **kw) as llm:
        llm.engine.overlap_steps = True  # the pipelined step, as on the GPU
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    err = capfd.readouterr().err
    decode = [line for line in err.splitlines() if line.startswith("[step profile tp=1] decode at batch 3:")]
    assert len(decode) == 1, err
    for phase in ("inputs", "forward", "logits", "sample", "result", "outside", "period"):
        assert f" {phase} " in decode[0], f"{phase} missing: {decode[0]}"
    assert "[step profile tp=1] prefill/mixed: 1 steps" in err
