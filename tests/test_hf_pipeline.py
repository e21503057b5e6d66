"""The drop-in pipeline side by side with transformers' own TextGenerationPipeline on the same weights
(a tiny random Llama with SmolLM2's tokenizer and chat template, fp32, CPU): same outputs, same format,
same defaults; and every argument the engine cannot honour is refused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from paged_backend import LLM
from paged_backend.adapters.hf_pipeline import PagedTextGenerationPipeline, pipeline

CHAT = [{"role": "user", "content": "Hi there"}]
CHAT2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
PREFILL = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Sure, it is"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def pipes(model_dir):
    ours = pipeline("text-generation", model=str(model_dir), dtype="float32", device="cpu")
    theirs = transformers.pipeline("text-generation", model=str(model_dir), dtype=torch.float32, device="cpu")
    yield ours, theirs
    ours.llm.shutdown()


def _plain(out):
    """transformers returns generated_token_ids as lists already; keep the comparison strict otherwise."""
    if isinstance(out, list):
        return [_plain(o) for o in out]
    if isinstance(out, dict) and "generated_token_ids" in out:
        v = out["generated_token_ids"]
        return {**out, "generated_token_ids": v.tolist() if hasattr(v, "tolist") else list(v)}
    return out


CASES = {
    "str": ("The capital of France is", {}),
    "list": (["Hello", "Once upon a time, in a land far away,", "1, 2, 3,"], {}),
    "chat": (CHAT, {}),
    "list-of-chats": ([CHAT, CHAT2], {}),
    "return_full_text=True": (["Hello", "Bonjour"], {"return_full_text": True}),
    "return_full_text=False": (["Hello", "Bonjour"], {"return_full_text": False}),
    "chat, return_full_text=False": ([CHAT, CHAT2], {"return_full_text": False}),
    "chat prefill (continue_final_message)": (PREFILL, {}),
    "return_tensors": (["Hello", "Bonjour"], {"return_tensors": True}),
    "max_length": ("Hello world, this is", {"max_length": 14}),
    "repetition_penalty": ("The the the the", {"repetition_penalty": 1.5}),
    "stop_sequence": (["Hello", "Once upon"], {"stop_sequence": ["e", "a"]}),
    "prefix": ("world", {"prefix": "Hello "}),
    "empty prompt": ("", {}),
    "generation_config": ("Hello", {"generation_config": transformers.GenerationConfig(do_sample=False,
                                                                                       max_new_tokens=7)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_identical_to_transformers(pipes, case):
    ours, theirs = pipes
    inputs, kwargs = CASES[case]
    if "generation_config" not in kwargs:
        kwargs = {"do_sample": False, "max_new_tokens": 12, **kwargs}
        if "max_length" in kwargs:
            kwargs.pop("max_new_tokens")
    got, expected = _plain(ours(inputs, **kwargs)), _plain(theirs(inputs, **kwargs))
    assert got == expected


def test_output_shapes(pipes):
    ours, _ = pipes
    one = ours("Hello", do_sample=False, max_new_tokens=4)
    assert isinstance(one, list) and len(one) == 1 and isinstance(one[0]["generated_text"], str)
    chat = ours(CHAT, do_sample=False, max_new_tokens=4)
    assert chat[0]["generated_text"][:-1] == CHAT and chat[0]["generated_text"][-1]["role"] == "assistant"
    assert ours([], max_new_tokens=4) == []


def test_sampling_num_return_sequences_same_shape(pipes):
    ours, theirs = pipes
    for inputs in (["Hello", "Bonjour"], "Hello", [CHAT, CHAT2]):
        kwargs = dict(do_sample=True, num_return_sequences=3, max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9)
        got, expected = ours(inputs, **kwargs), theirs(inputs, **kwargs)
        assert type(got) is type(expected) and len(got) == len(expected)
        for g, e in zip(got, expected) if isinstance(inputs, list) else [(got, expected)]:
            assert len(g) == len(e) == 3
            assert [sorted(r) for r in g] == [sorted(r) for r in e]
            assert [type(r["generated_text"]) for r in g] == [type(r["generated_text"]) for r in e]
    # torch's global seed makes a sampled call repeatable, as it does for transformers
    torch.manual_seed(1)
    a = ours("Hello", do_sample=True, max_new_tokens=8, num_return_sequences=2)
    torch.manual_seed(1)
    assert ours("Hello", do_sample=True, max_new_tokens=8, num_return_sequences=2) == a


def test_defaults_follow_transformers(pipes, model_dir, tmp_path):
    ours, _ = pipes
    # no generation config of the model sets them: the pipeline's defaults, then generate()'s (top_k=50)
    sp = ours._sampling_params(ours._resolve_generation({}), prompt_len=5, prefix_len=0)
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.top_p) == (256, 0.7, 50, 1.0)
    assert sp.stop_token_ids == [2] and sp.ignore_eos
    # init-time kwargs are call defaults; a call's generation_config replaces them, as in transformers
    p = PagedTextGenerationPipeline(ours.llm, max_new_tokens=9, do_sample=False)
    assert p._sampling_params(p._resolve_generation({}), 5, 0).max_tokens == 9
    r = p._resolve_generation({"generation_config": transformers.GenerationConfig(max_new_tokens=3)})
    assert r["max_new_tokens"] == 3 and r["do_sample"] is True
    # a model whose generation_config.json says greedy with its own length: the pipeline keeps it
    import shutil

    d = tmp_path / "greedy-model"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "generation_config.json").read_text())
    cfg.update(do_sample=False, max_new_tokens=5, temperature=0.3)
    (d / "generation_config.json").write_text(json.dumps(cfg))
    with LLM(str(d), dtype="float32", device="cpu") as llm:
        p = PagedTextGenerationPipeline(llm)
        sp = p._sampling_params(p._resolve_generation({}), 5, 0)
        assert (sp.max_tokens, sp.temperature) == (5, 0.0)
        hf = transformers.pipeline("text-generation", model=str(d), dtype=torch.float32, device="cpu")
        assert p(["Hello", "Bonjour"]) == hf(["Hello", "Bonjour"])


@pytest.mark.parametrize("kwargs, match", [
    ({"num_beams": 2}, "num_beams"),
    ({"no_repeat_ngram_size": 3}, "no_repeat_ngram_size"),
    ({"output_scores": True, "return_dict_in_generate": True}, "not supported"),
    ({"stopping_criteria": [object()]}, "unsupported argument"),  # streamer=: test_hf_pipeline_objects.py
    ({"do_sample": False, "num_return_sequences": 2}, "num_return_sequences"),
    ({"do_sample": True, "temperature": 0.0}, "strictly positive"),
    ({"return_full_text": True, "return_text": True}, "mutually exclusive"),
    ({"handle_long_generation": "middle"}, "handle_long_generation"),
    ({"padding": "max_length", "max_length": 40}, "padded"),
])
def test_unsupported_arguments_raise(pipes, kwargs, match):
    ours, _ = pipes
    with pytest.raises(ValueError, match=match):
        ours("Hello", **kwargs)


def test_construction_errors(pipes, model_dir):
    ours, _ = pipes
    with pytest.raises(ValueError, match="task"):
        pipeline("summarization", model=str(model_dir))
    with pytest.raises(ValueError, match="already fixed"):
        pipeline("text-generation", model=ours.llm, max_model_len=64)
    with pytest.raises(TypeError, match="a loaded transformers model"):
        pipeline("text-generation", model=object())


def test_registered_with_transformers(pipes, model_dir):
    ours, theirs = pipes
    # a directory: transformers reads its config, our loader stands in for the model class (no HF weights loaded)
    reg = transformers.pipeline("paged-text-generation", model=str(model_dir), dtype=torch.float32, device="cpu",
                                model_kwargs={"max_model_len": 256})
    try:
        assert isinstance(reg, PagedTextGenerationPipeline) and reg.llm.args.max_model_len == 256
        assert reg(["Hello", "Bonjour"], do_sample=False, max_new_tokens=6) == \
            theirs(["Hello", "Bonjour"], do_sample=False, max_new_tokens=6)
    finally:
        reg.llm.shutdown()
    # an existing LLM (the way in for aliases and .gguf files, which have no config.json)
    reg2 = transformers.pipeline("paged-text-generation", model=ours.llm)
    assert reg2.llm is ours.llm
    assert reg2(CHAT, do_sample=False, max_new_tokens=6) == theirs(CHAT, do_sample=False, max_new_tokens=6)


def test_generator_input_streams(pipes):
    ours, theirs = pipes
    gen = ours((t for t in ["Hello", "Bonjour"]), do_sample=False, max_new_tokens=5)
    assert not isinstance(gen, list)
    assert list(gen) == theirs(["Hello", "Bonjour"], do_sample=False, max_new_tokens=5)
