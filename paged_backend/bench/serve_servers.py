"""The servers `bench serve` starts itself, one after the other, on the same HF model folder:
ours (`paged-backend serve`, BentoML) and transformers' own (`transformers serve --continuous-batching`).

Both read one HF folder (config, safetensors, tokenizer) so that they compute on the same weights:
a shape in SHAPES gets random weights saved once; an alias or a .gguf file is written out by our
loader through transformers (`transformers_reference_model`); an HF folder is used as it is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import paged_backend
from paged_backend.bench.workload import SHAPES, make_model_dir

SERVERS = ("ours", "transformers")


def _dtype(name: str):
    import torch

    return {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def prepare_model_dir(model: str, dtype: str, device: str, workdir: Path) -> Path:
    """An HF folder both servers load (see the module docstring)."""
    import torch
    import transformers

    if (Path(model) / "config.json").is_file():
        return Path(model)
    target = workdir / f"model-{Path(model).name}"
    if (target / "config.json").is_file():
        return target
    if model in SHAPES:
        device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        make_model_dir(model, target)
        dt = _dtype(dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
        print(f"[bench serve] writing random {dt} weights of the {model} shape to {target}", flush=True)
        torch.manual_seed(0)
        with torch.device(device):  # built where it runs: no minutes of CPU init for large shapes
            m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(target),
                                                              dtype=dt)
        m.save_pretrained(target)
        del m
        return target
    from paged_backend.loader import load_tokenizer, resolve_model, transformers_reference_model

    print(f"[bench serve] writing {model} as an HF folder ({dtype}) to {target}", flush=True)
    source = resolve_model(model)
    dt = _dtype(dtype) or torch.float32
    transformers_reference_model(source, dt).save_pretrained(target)
    load_tokenizer(source).save_pretrained(target)
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    size = {"float32": 4, "auto": 4}.get(dtype, 2)
    return cfg.num_hidden_layers * 2 * hkv * d * size


MAX_KV_TOKENS = 65536  # transformers' CB builds attention masks as wide as its cache: keep both bounded


def server_command(kind: str, model_dir: Path, port: int, dtype: str, device: str, kv_cache_memory: int | None,
                   extra: list[str]) -> list[str]:
    """The command line of one server. `kv_cache_memory` (bytes, at most MAX_KV_TOKENS tokens) sizes
    both servers' KV caches alike; on the CPU it must be given: transformers' continuous batching
    otherwise sizes its cache from the machine's total RAM."""
    tokens = None
    if kv_cache_memory:
        per_token = kv_bytes_per_token(model_dir, dtype)
        tokens = min(kv_cache_memory // per_token, MAX_KV_TOKENS)
    if kind == "ours":
        cmd = [sys.executable, "-m", "paged_backend.cli", "serve", "--model", str(model_dir), "--host",
               "127.0.0.1", "--port", str(port), "--dtype", dtype, "--device", device]
        if tokens:
            cmd += ["--kv-cache-memory", str(tokens * per_token)]
    else:
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
               "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
               "--device", device]
        if tokens:
            cmd += ["--cb-block-size", "16", "--cb-num-blocks", str(tokens // 16)]
    return cmd + extra


def server_version(kind: str) -> str:
    if kind == "ours":
        return f"paged-backend {paged_backend.__version__}"
    import transformers

    return f"transformers {transformers.__version__}"


class ServerProcess:
    """A server in its own process group, its output in a log file; stopped by its group id."""

    def __init__(self, kind: str, cmd: list[str], port: int, log_path: Path, env: dict[str, str]):
        self.kind, self.cmd, self.log_path = kind, cmd, log_path
        self.url = f"http://127.0.0.1:{port}"
        full_env = dict(os.environ)
        # the server imports the same paged_backend as this process (a checkout or an install)
        root = str(Path(paged_backend.__file__).resolve().parents[1])
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in [root, full_env.get("PYTHONPATH", "")] if p)
        full_env.setdefault("BENTOML_DO_NOT_TRACK", "True")
        full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        full_env.update(env)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    def wait_ready(self, timeout: float, fallback_id: str | None = None) -> str:
        """Polls GET /v1/models until it lists a model; returns that model's id. fallback_id: the id to
        use when the server answers with an empty list (some `transformers serve` versions list only
        the hub cache's models, not the one given on their command line, which they serve anyway)."""
        import httpx

        t0 = time.monotonic()
        last_print = t0
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}; log "
                                   f"{self.log_path}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/v1/models", timeout=2)
                if r.status_code == 200:
                    data = r.json().get("data")
                    if data:
                        return data[0]["id"]
                    if fallback_id is not None:
                        return fallback_id
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                print(f"[bench serve] waiting for {self.kind} ({last_print - t0:.0f} s)", flush=True)
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.kind} server not ready within {timeout:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # both servers shut down cleanly on Ctrl-C
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
