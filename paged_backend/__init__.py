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
from paged_backend.structured.spec import StructuredOutputs
from paged_backend.tools.calling import ToolCalling
from paged_backend.tools.parsers import ToolCall
from paged_backend.tools.stream import ToolCallStream

__all__ = [
    "LLM",
    "AsyncLLM",
    "EngineDeadError",
    "SamplingParams",
    "StructuredOutputs",
    "ToolCalling",
    "ToolCall",
    "ToolCallStream",
    "RequestOutput",
    "CompletionOutput",
    "RequestMetrics",
    "EngineArgs",
    "EngineStats",
]
__version__ = "0.1.0"
