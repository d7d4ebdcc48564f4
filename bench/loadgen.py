"""Load generation: closed loop at a fixed concurrency, or open-loop Poisson arrivals.

    closed loop   `concurrency` clients; each sends its next request the moment the
                  previous one finishes, until the point's requests are used up
    open loop     requests sent at precomputed Poisson arrival times, whatever is in flight

A point ends when every request has finished, or at its time cap: then nothing
more is sent, requests still running are cancelled, and the point is marked
truncated. Throughput counts the tokens that arrived inside the point's window.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from bench.systems import RequestRecord, System
from bench.workload import BenchRequest

PERCENTILES = (50, 90, 99)


@dataclass
class PointRun:
    records: list[RequestRecord]
    started: float
    ended: float
    truncated: bool


async def _send(system: System, record: RequestRecord, on_done: Callable[[], None]) -> None:
    record.sent = time.perf_counter()
    try:
        await system.generate(record.request, record)
        record.finished = time.perf_counter()
    except asyncio.CancelledError:
        record.error = "cancelled at the time cap"
        raise
    except Exception as e:  # a failed request is reported, not fatal to the run
        record.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        on_done()


async def _cancel(tasks) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def closed_loop(system: System, requests: Sequence[BenchRequest], concurrency: int, time_cap_s: float,
                      on_done: Callable[[], None] = lambda: None) -> PointRun:
    system.set_concurrency(concurrency)
    records: list[RequestRecord] = []
    next_index = iter(range(len(requests)))

    async def client():
        for i in next_index:
            records.append(RequestRecord(requests[i]))
            await _send(system, records[-1], on_done)

    started = time.perf_counter()
    clients = [asyncio.ensure_future(client()) for _ in range(concurrency)]
    done, pending = await asyncio.wait(clients, timeout=time_cap_s)
    for task in done:
        task.result()  # re-raise a bug in the loop itself
    if pending:
        ended = time.perf_counter()
        await _cancel(pending)
    else:
        ended = max(r.finished or r.sent for r in records)
    return PointRun(records, started, ended, truncated=bool(pending))


async def open_loop(system: System, requests: Sequence[BenchRequest], arrivals: np.ndarray, time_cap_s: float,
                    max_concurrency: int, on_done: Callable[[], None] = lambda: None) -> PointRun:
    """Send requests[i] at started + arrivals[i] seconds (those due after the time cap are not sent)."""
    system.set_concurrency(max_concurrency)
    records: list[RequestRecord] = []
    tasks: list[asyncio.Future] = []
    started = time.perf_counter()
    cap = started + time_cap_s
    for request, offset in zip(requests, arrivals):
        if started + float(offset) >= cap:
            break
        await asyncio.sleep(max(started + float(offset) - time.perf_counter(), 0.0))
        records.append(RequestRecord(request))
        tasks.append(asyncio.ensure_future(_send(system, records[-1], on_done)))
    pending = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(cap - time.perf_counter(), 0.0))
    if pending:
        ended = time.perf_counter()
        await _cancel(pending)
    else:
        ended = max((r.finished or r.sent for r in records), default=started)
    return PointRun(records, started, ended, truncated=bool(pending) or len(records) < len(requests))


# --------------------------------------------------------------------------- figures


def percentiles(values: Sequence[float]) -> dict[str, Optional[float]]:
    if len(values) == 0:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES} | {"mean": float(arr.mean())}


def summarize(run: PointRun) -> dict:
    """Throughput over the window [first send, last finish or time cap]; latencies of the requests in it.

    TTFT: send to first token. ITL: gaps between consecutive tokens of a request, pooled
    over requests. E2E: send to last token, finished requests only. TPOT: per finished
    request, (last token - first token) / (tokens - 1): its mean decode time per token,
    which tokens arriving in bursts (several stream messages read at once) do not distort.
    """
    window = max(run.ended - run.started, 1e-9)
    finished = [r for r in run.records if r.finished is not None and r.error is None]
    failed = [r for r in run.records if r.error is not None and not r.error.startswith("cancelled")]
    tokens_in_window = sum(int(np.sum(np.asarray(r.token_times) <= run.ended)) for r in run.records)
    ttft = [r.token_times[0] - r.sent for r in run.records if r.token_times]
    itl = [gap for r in run.records for gap in np.diff(r.token_times)]
    e2e = [r.finished - r.sent for r in finished]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in finished if len(r.token_times) > 1]
    short = [r for r in finished if len(r.token_times) != r.request.max_new_tokens]
    return {
        "window_s": window,
        "requests_sent": len(run.records),
        "requests_finished": len(finished),
        "requests_failed": len(failed),
        "errors": sorted({r.error for r in failed})[:3],
        "wrong_length": len(short),  # finished with other than max_new_tokens tokens: must be 0
        "truncated": run.truncated,
        "output_tokens": tokens_in_window,
        "output_tokens_per_s": tokens_in_window / window,
        "requests_per_s": len(finished) / window,
        "prompt_tokens_finished": sum(len(r.request.prompt_token_ids) for r in finished),
        "ttft_s": percentiles(ttft),
        "itl_s": percentiles(itl),
        "e2e_s": percentiles(e2e),
        "tpot_s": percentiles(tpot),
    }


def occupancy(before: dict, after: dict, slots: int, run: PointRun) -> dict:
    """Engine step figures between two counter readings.

    rows per step = output tokens of the point / steps (each sampling row yields one token a step);
    occupancy = rows per step / slots (KV slots for attnserve, the batch size for static batchers).
    """
    delta = {k: after[k] - before.get(k, 0) for k in after}
    steps = delta.get("steps", 0)
    if not steps:
        return {}
    tokens = sum(len(r.token_times) for r in run.records)
    out = {"steps": int(steps), "rows_per_step": tokens / steps, "occupancy": tokens / steps / slots}
    if "step_seconds" in delta:
        out["mean_step_ms"] = 1000 * delta["step_seconds"] / steps
        out["tokens_per_step"] = delta["step_tokens"] / steps  # prompt and decode tokens computed
    if "calls" in delta:
        out["calls_per_step"] = delta["calls"] / steps
        out["prefill_tokens_per_step"] = delta["prefill_tokens"] / steps
    if "rows" in delta:
        out["computed_rows_per_step"] = delta["rows"] / steps  # static batches compute finished rows too
    return out
