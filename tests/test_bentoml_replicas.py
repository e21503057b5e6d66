"""Replicas are BentoML's job: one service with two workers is two engines in two processes behind one
port; one OpenAI client's concurrent requests are answered by both, with the same greedy outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")

pytestmark = pytest.mark.slow  # each engine here starts processes (fresh interpreters importing torch)
REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 240


def _engines_answering(url: str, attempts: int = 20) -> set[int]:
    """The prompt-token counts /stats reports: each answer comes from one replica's engine."""
    seen = set()
    for _ in range(attempts):
        seen.add(httpx.get(f"{url}/stats", timeout=10).json()["total_prompt_tokens"])
    return seen


def test_two_replicas_answer_one_client(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    (tmp_path / "replicas.py").write_text(
        "from paged_backend.adapters.bentoml import make_service\n"
        f"Replicated = make_service('Replicated', engine_args=dict(model={str(model_dir)!r}, device='cpu', "
        "dtype='float32', max_model_len=256, kv_cache_memory=8 << 20), workers=2)\n"
    )
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml-home"), BENTOML_DO_NOT_TRACK="True",
               PAGED_BACKEND_TEST_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "replicas:Replicated", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "bentoml serve did not get ready"
            time.sleep(0.5)
        # One client; no kept-alive connections, so that the replicas' shared socket hands each
        # request to whichever replica accepts it (a reused connection stays with one replica).
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120,
                               http_client=httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)))

        def ask(i: int):
            return client.completions.create(model=str(model_dir), prompt="The replicas say", max_tokens=8,
                                             temperature=0)

        answers, sent = set(), 0
        for _ in range(5):  # until both replicas have answered (the kernel spreads the connections)
            with ThreadPoolExecutor(8) as pool:
                for r in pool.map(ask, range(8)):
                    answers.add(r.choices[0].text)
                    sent += r.usage.prompt_tokens
            # Each replica counts only what it served: one count strictly between 0 and all of it
            # means the other replica served the rest.
            counts = _engines_answering(url)
            if all(0 < c < sent for c in counts):
                break
        assert len(answers) == 1, "the replicas run the same weights: greedy answers must agree"
        assert all(0 < c < sent for c in counts), f"not both replicas answered ({sent} prompt tokens sent): {counts}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert not [p for p in psutil.process_iter(["cmdline"]) if "replicas:Replicated" in " ".join(p.info["cmdline"] or [])]
