"""A real `bentoml serve` process of the service on 127.0.0.1, for the service's tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICE = "paged_backend.adapters.bentoml:PagedLLMService"
STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve` in its own process group; stopped by its PID (group) in `stop()`."""

    def __init__(self, tmp: Path, name: str, args: dict[str, str], env: Optional[dict[str, str]] = None,
                 api_key: str = "unused", host: Optional[str] = "127.0.0.1"):
        """`host` None: bentoml serve's own default (the service's config)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"{name}.log"
        home = tmp / "bentoml-home"
        home.mkdir(exist_ok=True)
        extra_env, env = env or {}, dict(os.environ)
        env.update(
            BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True", TOKENIZERS_PARALLELISM="false",
            PAGED_BACKEND_TEST_THREADS=os.environ.get("PAGED_BACKEND_TEST_THREADS", "1"),
            PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        env.update(extra_env)
        self.api_key = api_key
        cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--port", str(self.port)]
        cmd += ["--host", host] if host else []
        for k, v in args.items():
            cmd += ["--arg", f"{k}={v}"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"bentoml serve was not ready within {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0,
                             timeout=REQUEST_TIMEOUT_S, **kw)

    def async_client(self) -> "openai.AsyncOpenAI":
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S)

    def stats(self) -> dict:
        r = httpx.get(f"{self.url}/stats", timeout=10, headers={"Authorization": f"Bearer {self.api_key}"})
        r.raise_for_status()
        return r.json()


def wait_idle(server: Server, timeout: float = 15.0) -> dict:
    """The server's stats once no request runs, waits or holds a KV block."""
    deadline = time.monotonic() + timeout
    while True:
        st = server.stats()
        if st["num_blocks_used"] == 0 and st["num_running"] == 0 and st["num_waiting"] == 0:
            return st
        if time.monotonic() > deadline:
            pytest.fail(f"requests still hold KV blocks {timeout} s later: {st}")
        time.sleep(0.1)


class SharedServers:
    """The server configurations several test modules use as they are, each started once per session
    (a start-up costs a fresh interpreter importing torch, transformers and bentoml, then a model load).
    Tests on them assert only what holds whatever other modules sent before (they wait for the server to
    be idle where counts matter). Servers with their own flags (keys, limits, timeouts) stay in their module."""

    def __init__(self, tmp: Path, tiny_model_dir: Path):
        self.tmp, self.tiny_dir = tmp, tiny_model_dir
        self.configs = {
            "tiny": {"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu",
                     "served_model_name": "tiny", "max_model_len": "512"},
            "smollm": {"model": "smollm2-135m-instruct", "dtype": "float32", "device": "cpu", "max_model_len": "1024"},
        }
        self.started: dict[str, Server] = {}

    def get(self, *names: str) -> dict[str, Server]:
        """The named servers, ready; those not yet running start together (their start-ups overlap)."""
        new = [n for n in names if n not in self.started]
        for n in new:
            self.started[n] = Server(self.tmp, n, self.configs[n])
            if n == "tiny":
                self.started[n].model_dir = self.tiny_dir  # for tests that compare with an offline engine
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for n in names:  # a server that died since an earlier module used it fails here, with its log
            self.started[n].wait_ready(deadline)
        return {n: self.started[n] for n in names}

    def stop(self) -> None:
        for s in self.started.values():
            s.stop()
