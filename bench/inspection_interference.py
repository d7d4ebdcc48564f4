"""Do inspections slow generation? Streams' inter-token latency with and without a burst of InspectAttention calls.

    python -m bench.inspection_interference --model models/smollm2-135m-instruct

One server process; `--streams` greedy streams decode `--tokens` tokens each, in rounds that
alternate "quiet" (streams only) and "burst" (the same streams while `--inspectors` clients
call InspectAttention back to back on a `--inspect-tokens`-token prompt, every layer and head),
so drift on a shared machine falls on both alike. Prints p50 and p99 of the gaps between
stream messages per token, per condition, and the inspections answered.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from server.client import INSPECT_MAX_RECEIVE_BYTES, AttnserveClient

READY = re.compile(r"attnserve ready: grpc [^:]+:(\d+)")
SPAWN = multiprocessing.get_context("spawn")  # no fork once gRPC has started threads in this process


def start_server(model: Path, flags: list[str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model), "--host", "127.0.0.1",
                                "--port", "0", "--metrics-port", "-1", "--http-port", "0", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    for line in process.stdout:
        match = READY.search(line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, int(match.group(1))
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError("the server did not start")


def stream_gaps(target: str, prompt_ids: list[int], tokens: int) -> list[float]:
    """Seconds between consecutive stream messages, divided by the tokens each brought."""
    gaps = []
    with AttnserveClient(target, timeout=600) as client:
        last = None
        for message in client.stream(prompt_token_ids=prompt_ids, max_new_tokens=tokens, ignore_eos=True):
            now = time.perf_counter()
            if last is not None and message.token_ids:
                gaps.extend([(now - last) / len(message.token_ids)] * len(message.token_ids))
            last = now
    return gaps


def inspect_until(target: str, prompt_ids: list[int], stop, answered, refused) -> None:
    """In a process of its own, at the lowest priority: decoding answers of tens of MB is the client's work, which a
    deployment does elsewhere; here it must neither hold the stream clients' GIL nor take the server's cores."""
    os.nice(19)
    with AttnserveClient(target, timeout=600, options=[("grpc.max_receive_message_length",
                                                         INSPECT_MAX_RECEIVE_BYTES)]) as client:
        while not stop.is_set():
            try:
                client.inspect_attention(prompt_token_ids=prompt_ids)
                with answered.get_lock():
                    answered.value += 1
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                with refused.get_lock():
                    refused.value += 1
                stop.wait(0.05)


def run_round(target: str, streams: int, tokens: int, inspectors: int, inspect_ids: list[int],
              answered, refused) -> list[float]:
    stop = SPAWN.Event()
    burst = [SPAWN.Process(target=inspect_until, args=(target, inspect_ids, stop, answered, refused))
             for _ in range(inspectors)]
    for process in burst:
        process.start()
    if burst:
        deadline = time.monotonic() + 120
        while answered.value + refused.value == 0 and time.monotonic() < deadline:  # the burst is under way
            time.sleep(0.05)
    results: list[list[float]] = [[] for _ in range(streams)]

    def one(i):
        results[i] = stream_gaps(target, [1 + (7 * i + j) % 200 for j in range(16)], tokens)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    for process in burst:
        process.join(600)
    return [g for r in results for g in r]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inspection_interference", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each condition, alternating")
    parser.add_argument("--inspectors", type=int, default=2, help="clients calling InspectAttention during a burst")
    parser.add_argument("--inspect-tokens", type=int, default=128)
    parser.add_argument("--server-flag", action="append", default=[], help="extra `python -m server` flag (repeatable)")
    args = parser.parse_args(argv)
    process, port = start_server(args.model, ["--kv-slots", str(max(args.streams, 1)), "--max-seq-len", "512",
                                              *args.server_flag])
    target = f"127.0.0.1:{port}"
    inspect_ids = [3 + (11 * j) % 400 for j in range(args.inspect_tokens)]
    try:
        with AttnserveClient(target, timeout=600, options=[("grpc.max_receive_message_length",
                                                             INSPECT_MAX_RECEIVE_BYTES)]) as client:
            client.inspect_attention(prompt_token_ids=inspect_ids[:8], layers=[0])  # start the inspection session
            client.generate(prompt_token_ids=inspect_ids[:8], max_new_tokens=8)
        gaps = {"quiet": [], "burst": []}
        answered, refused = SPAWN.Value("i", 0), SPAWN.Value("i", 0)
        for round_index in range(args.rounds):
            quiet = run_round(target, args.streams, args.tokens, 0, inspect_ids, answered, refused)
            answered_before = answered.value
            burst = run_round(target, args.streams, args.tokens, args.inspectors, inspect_ids, answered, refused)
            gaps["quiet"] += quiet
            gaps["burst"] += burst
            print(f"round {round_index}: p99 quiet {np.percentile(quiet, 99) * 1e3:.1f} ms, burst "
                  f"{np.percentile(burst, 99) * 1e3:.1f} ms ({answered.value - answered_before} inspections "
                  "answered during it)", flush=True)
    finally:
        process.kill()
        process.wait(30)
    for condition, values in gaps.items():
        ms = np.array(values) * 1e3
        print(f"{condition:>5}: {len(ms)} gaps, inter-token p50 {np.percentile(ms, 50):.2f} ms, "
              f"p99 {np.percentile(ms, 99):.2f} ms")
    quiet, burst = (np.percentile(np.array(gaps[k]) * 1e3, 99) for k in ("quiet", "burst"))
    print(f"burst p99 / quiet p99 = {burst / quiet:.3f}; inspections answered {answered.value}, refused "
          f"{refused.value} (queue full)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
