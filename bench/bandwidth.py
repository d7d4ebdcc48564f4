"""The memory-bandwidth floor of decoding one token at batch size 1.

A decode step at batch 1 must read every weight once (the token-embedding table
only one row, when it is just gathered from), so it cannot take less than

    floor = weight bytes read per token / memory bandwidth

The bandwidth is measured in the same run with a large numpy copy, counted as
STREAM counts a copy: bytes read + bytes written per second.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _best_copy_seconds(src: np.ndarray, dst: np.ndarray, threads: int, repeats: int) -> float:
    """Best time to copy src into dst, split into `threads` slices copied at once (numpy releases the GIL)."""
    slices = [slice(i * len(src) // threads, (i + 1) * len(src) // threads) for i in range(threads)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))
            best = min(best, time.perf_counter() - started)
    return best


def copy_bandwidth(megabytes: int = 1024, repeats: int = 7, threads: int = 0) -> dict:
    """Best of `repeats` copies of a `megabytes` buffer (far larger than any cache), on one thread and on
    `threads` (default: every core). The floor uses the higher figure: the stricter target."""
    threads = threads or os.cpu_count() or 1
    src = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    out = {"buffer_bytes": src.nbytes, "threads": threads}
    for label, n in (("1_thread", 1), (f"{threads}_threads", threads)):
        seconds = _best_copy_seconds(src, dst, n, repeats)
        out[f"copy_s_{label}"] = seconds
        out[f"bandwidth_bytes_per_s_{label}"] = 2 * src.nbytes / seconds  # read + written, as STREAM counts a copy
    out["bandwidth_bytes_per_s"] = max(out["bandwidth_bytes_per_s_1_thread"], out[f"bandwidth_bytes_per_s_{threads}_threads"])
    return out


def weight_bytes_per_token(model_path: Path) -> dict:
    """Bytes of initializers one decode step at batch 1 reads, from the ONNX graph.

    Every initializer is read whole, except one that only Gather nodes index into as their
    data input (a token-embedding table), of which one row per token is read.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, position))
    total = stored = 0
    for init in graph.initializer:
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        nbytes = count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        stored += nbytes
        uses = consumers.get(init.name, [])
        if uses and all(op == "Gather" and position == 0 for op, position in uses) and len(init.dims) == 2:
            total += nbytes // init.dims[0]  # one row per token
        else:
            total += nbytes
    return {"weight_bytes_per_token": total, "weight_bytes_stored": stored}


def floor(model_path: Path, bandwidth: dict) -> dict:
    weights = weight_bytes_per_token(model_path)
    seconds = weights["weight_bytes_per_token"] / bandwidth["bandwidth_bytes_per_s"]
    return {**weights, "floor_s_per_token": seconds, "floor_tokens_per_s": 1.0 / seconds}
