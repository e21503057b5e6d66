"""The pipeline drop-in with an already-loaded transformers model (a Phi-3, which runs through
transformers' modeling code) and with `streamer=`: side by side with transformers' own pipeline on
the same model object."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers

from paged_backend.adapters.hf_pipeline import pipeline
from paged_backend.models.hf import matrix

PROMPT = "The capital of France is"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def objects(tmp_path_factory, smollm_tokenizer):
    path = matrix.save_tiny_model("Phi3ForCausalLM", tmp_path_factory.mktemp("phi3"), smollm_tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def pipes(objects):
    model, tok = objects
    ours = pipeline("text-generation", model=model, tokenizer=tok, max_num_batched_tokens=64)
    theirs = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    yield ours, theirs
    ours.llm.shutdown()


def test_model_object_same_outputs_as_transformers(pipes, objects):
    ours, theirs = pipes
    kw = dict(do_sample=False, max_new_tokens=12)
    assert ours([PROMPT, "Hello"], **kw) == theirs([PROMPT, "Hello"], **kw)
    chat = [{"role": "user", "content": "Hi there"}]
    assert ours(chat, **kw) == theirs(chat, **kw)
    assert ours.llm.engine.runner.model.hf is objects[0]  # used in place


def test_text_streamer_prints_what_transformers_prints(pipes, objects, capsys):
    ours, theirs = pipes
    tok = objects[1]
    printed = {}
    for name, pipe in (("ours", ours), ("theirs", theirs)):
        out = pipe(PROMPT, streamer=transformers.TextStreamer(tok, skip_prompt=True), do_sample=False,
                   max_new_tokens=12)
        printed[name] = capsys.readouterr().out
    assert printed["ours"] == printed["theirs"]
    assert printed["ours"].strip() and printed["ours"].rstrip("\n") == out[0]["generated_text"][len(PROMPT):]


def test_text_iterator_streamer_thread_recipe(pipes, objects):
    """transformers' documented recipe: generate in a thread, iterate the streamer in the caller."""
    ours, _ = pipes
    tok = objects[1]
    expected = ours(PROMPT, do_sample=False, max_new_tokens=16, return_full_text=False)[0]["generated_text"]
    streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, timeout=120)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=ours(PROMPT, streamer=streamer, do_sample=False, max_new_tokens=16, return_full_text=False)))
    thread.start()
    pieces = list(streamer)  # raises queue.Empty after the timeout if the streamer were never ended
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert len(pieces) > 1, "the text did not come in pieces"
    assert "".join(pieces) == expected == result["out"][0]["generated_text"]


def test_streamer_errors_end_the_stream(pipes, objects):
    ours, _ = pipes
    streamer = transformers.TextIteratorStreamer(objects[1], timeout=120)
    with pytest.raises(ValueError, match="one sequence at a time"):
        ours(PROMPT, streamer=streamer, do_sample=True, num_return_sequences=2)
    assert "".join(streamer) == "", "a consumer of the streamer would wait forever"
    with pytest.raises(TypeError, match="put"):
        ours(PROMPT, streamer=object())
