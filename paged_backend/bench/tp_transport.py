"""Micro-benchmark of how rank 0 hands a step to a tensor-parallel worker, on one host (CPU only):

- `pickle-gloo`: the step input pickled and broadcast over the gloo control group
  (`broadcast_object_list`, what the executor did first);
- `wire-gloo`: the flat int32 encoding (`runtime/step_wire.py`) over the same gloo group;
- `wire-shm`: the same encoding through shared memory and a notify pipe (`runtime/step_channel.py`).

A decode step of `--batch` sequences (contexts U[100, 1280], 16-token blocks) goes to one worker
process, which decodes it and answers one byte on a pipe; rank 0 waits for that byte. Reported per
mode: the median time rank 0 spends sending (its critical path) and the median round trip; then
`busy send`: rank 0 sends two steps back to back to a worker that spends `--busy-ms` on each one
(as a real worker launching its step does): the median time of the second send, i.e. how long rank 0
is held up by a worker that is not yet waiting for its next step.

    python -m paged_backend.bench.tp_transport --batch 256 --iters 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

MODES = ("pickle-gloo", "wire-gloo", "wire-shm")


def decode_step(batch: int, block_size: int = 16, seed: int = 0):
    from paged_backend.runtime.step_input import StepInput, table_width

    rng = np.random.default_rng(seed)
    lens = rng.integers(100, 1281, batch)
    width = table_width(int(lens.max()), block_size)
    tables = rng.integers(0, 50_000, (batch, width)).astype(np.int32)
    positions = lens - 1
    slots = tables[np.arange(batch), positions // block_size].astype(np.int64) * block_size + positions % block_size
    return StepInput(
        input_ids=np.zeros(batch, np.int64), positions=positions, slot_mapping=slots, seq_lens=lens,
        query_start_loc=np.arange(batch + 1), block_tables=tables, logit_rows=np.arange(batch),
        pending_dst=np.arange(batch), pending_src=np.arange(batch), max_query_len=1, max_seq_len=int(lens.max()),
    )


def _group(port: int, rank: int):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    return dist.group.WORLD


def _worker(mode: str, port: int, ack_fd: int, busy_after: int, busy_ms: float) -> None:
    from paged_backend.runtime import step_channel, worker

    control = _group(port, 1)
    if mode == "pickle-gloo":
        receive = lambda: worker.receive(control)  # noqa: E731
    else:
        receive = step_channel.open_receiver(control).receive
    n = 0
    while (step := receive()) is not None:
        step.int32_arrays()  # touch what the runner reads first
        n += 1
        if n > busy_after:  # the busy phase: as long as a real worker's launch of its step
            time.sleep(busy_ms / 1e3)
        os.write(ack_fd, b"\x01")


def run_mode(mode: str, batch: int, iters: int, busy_ms: float) -> dict:
    from paged_backend.runtime import step_channel, worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ack_r, ack_w = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    fds = [ack_w]
    shm = None
    if mode == "wire-shm":
        shm = step_channel.ShmStepSender(1)
        worker_fds, worker_env = shm.worker_fds(0)
        fds += worker_fds
        env.update(worker_env)
    cmd = [sys.executable, "-m", "paged_backend.bench.tp_transport", "--worker", mode, "--port", str(port),
           "--ack-fd", str(ack_w), "--busy-after", str(iters + 50), "--busy-ms", str(busy_ms)]
    proc = subprocess.Popen(cmd, env=env, pass_fds=fds)
    os.close(ack_w)
    if shm is not None:
        shm.spawned()
    control = _group(port, 0)
    if mode == "pickle-gloo":
        send = lambda step: worker.send(control, step and dataclasses.replace(step, sampling_rows=[]))  # noqa: E731
    else:
        send = (shm or step_channel.GlooStepSender(control)).send
    step = decode_step(batch)
    send_s, round_s = [], []
    for i in range(iters + 50):  # the first 50 warm up
        t0 = time.perf_counter()
        send(step)
        t1 = time.perf_counter()
        os.read(ack_r, 1)
        t2 = time.perf_counter()
        if i >= 50:
            send_s.append(t1 - t0)
            round_s.append(t2 - t0)
    busy_s = []
    for _ in range(max(20, iters // 20)):
        send(step)
        t0 = time.perf_counter()
        send(step)  # the worker is busy with the first one
        busy_s.append(time.perf_counter() - t0)
        os.read(ack_r, 1)
        os.read(ack_r, 1)
    send(None)
    proc.wait(timeout=30)
    import torch.distributed as dist

    dist.destroy_process_group()
    if shm is not None:
        shm.close()
    os.close(ack_r)
    return dict(mode=mode, batch=batch, send_us=statistics.median(send_s) * 1e6,
                round_trip_us=statistics.median(round_s) * 1e6, busy_send_us=statistics.median(busy_s) * 1e6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--busy-ms", type=float, default=2.0, help="the worker's time per step in the busy test")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ack-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--busy-after", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.port, a.ack_fd, a.busy_after, a.busy_ms)
        return 0
    import pickle

    from paged_backend.runtime.step_wire import wire_words

    step = decode_step(a.batch)
    print(f"decode step of {a.batch} sequences: pickled {len(pickle.dumps(step))} bytes, "
          f"wire {wire_words(step) * 4} bytes", flush=True)
    for mode in a.modes.split(","):
        r = run_mode(mode, a.batch, a.iters, a.busy_ms)
        print(f"{mode:12s} send {r['send_us']:7.1f} us   round trip {r['round_trip_us']:7.1f} us   "
              f"busy send ({a.busy_ms:g} ms worker) {r['busy_send_us']:7.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
