"""paged-backend: a paged-KV-cache LLM inference engine with its own Triton PagedAttention kernels.

The stable interface; adapters import nothing else:

    from paged_backend import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from paged_backend.args import EngineArgs
from paged_backend.async_llm import AsyncLLM, EngineDeadError
from paged_backend.engine.stats import EngineStats
from paged_backend.llm import LLM
from paged_backend.outputs import CompletionOutput, RequestMetrics, RequestOutput
from paged_backend.params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "EngineDeadError",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "RequestMetrics",
    "EngineArgs",
    "EngineStats",
]
__version__ = "0.1.0"
