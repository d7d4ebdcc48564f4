"""The systems under test, behind one small async interface.

    load generator ──generate(request, record)──► System ──► tokens, timestamped into record.token_times
                                                   │
      attnserve-grpc        `python -m server` in a subprocess, streamed over grpc.aio (the product)
      attnserve-inprocess   the same Engine in this process, no gRPC (what the server layer costs)
      attnserve-slots1      `python -m server --kv-slots 1` (no batching)
      torch-eager           PyTorch with a KV cache, static batches of up to `concurrency` requests
      no-kv-cache           our ONNX graph, the whole sequence recomputed every token, static batches
      genai-engine          onnxruntime-genai's Engine (its own batching: static batches of up to 4 on this
                            graph; engine.static_batching.max_batch_size in genai_config.json does not change that)
      genai-generator       onnxruntime-genai's Generator, static batches of up to min(`concurrency`, 32)
      attnserve-http, llamacpp   over HTTP: bench/peers.py

Every system generates greedily, exactly `max_new_tokens` tokens per request
(end-of-sequence ignored), from the same prompt token ids. Timestamps are
time.perf_counter(), taken where the tokens become visible to the caller: at the
gRPC client for the servers, in the engine's or the worker's thread otherwise.
"""
from __future__ import annotations

import asyncio
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from bench.workload import BenchRequest
from server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RequestRecord:
    """One request's timeline, in time.perf_counter() seconds."""

    request: BenchRequest
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    finished: Optional[float] = None  # None: cancelled at the time cap, or failed
    error: Optional[str] = None


class System:
    """A way of generating tokens. Subclasses set name/description and implement generate()."""

    name = "system"
    description = ""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def set_concurrency(self, concurrency: int) -> None:
        """The next point's concurrency (static batchers use it as their batch size)."""

    async def prepare(self, concurrency: int) -> bool:
        """Before a closed-loop point: reconfigure for its concurrency; True when that restarted the system."""
        return False

    async def generate(self, request: BenchRequest, record: RequestRecord) -> None:
        """Generate request.max_new_tokens tokens, appending each one's arrival time to record.token_times."""
        raise NotImplementedError

    async def counters(self) -> dict[str, float]:
        """Cumulative step counters (engine steps, rows...), read before and after a point."""
        return {}

    async def settle(self) -> None:
        """Return once requests cancelled at a time cap have left the system, so the next point starts clean."""

    def server_cpu_seconds(self) -> Optional[float]:
        """CPU time (user + system) used so far by a server subprocess; None when the system runs in-process."""
        return None

    def settings(self) -> dict:
        return {}


# --------------------------------------------------------------------------- attnserve over gRPC

READY = re.compile(r"attnserve ready: grpc [^:]+:(\d+), metrics (\d+|off)")


async def terminate(process: Optional[subprocess.Popen]) -> None:
    """SIGTERM a server process that is still running (it drains), SIGKILL it after a minute."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 60)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 10)


def _metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def metric_sum(text: str, name: str) -> float:
    """Sum over every sample of `name` (all label sets) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _server_default(name: str):
    """A `python -m server` flag's default, so the benchmark runs what an operator gets."""
    return next(f.default for f in fields(ServerConfig) if f.name == name)


@dataclass(frozen=True)
class ServerSettings:
    """The attnserve settings every attnserve system in a run shares (kv_slots aside for slots1)."""

    kv_slots: int
    max_seq_len: int
    prefill_chunk_tokens: int = _server_default("prefill_chunk_tokens")
    prefill_tokens_per_decode_row: int = _server_default("prefill_tokens_per_decode_row")
    max_queued_requests: int = 4096  # open-loop arrivals must queue, not be refused
    intra_op_threads: int = _server_default("intra_op_threads")  # 0: one per core
    intra_op_spinning: bool = _server_default("intra_op_spinning") == "on"

    def flags(self) -> list[str]:
        return ["--kv-slots", str(self.kv_slots), "--max-seq-len", str(self.max_seq_len),
                "--prefill-chunk-tokens", str(self.prefill_chunk_tokens),
                "--prefill-tokens-per-decode-row", str(self.prefill_tokens_per_decode_row),
                "--max-queued-requests", str(self.max_queued_requests),
                "--intra-op-threads", str(self.intra_op_threads),
                "--intra-op-spinning", "on" if self.intra_op_spinning else "off"]


class AttnserveGrpc(System):
    name = "attnserve-grpc"
    description = "python -m server (subprocess), GenerateStream over grpc.aio"

    def __init__(self, model_dir: Path, settings: ServerSettings, name: Optional[str] = None,
                 startup_timeout: float = 300.0):
        self.model_dir = Path(model_dir)
        self.server_settings = settings
        self.name = name or self.name
        self.startup_timeout = startup_timeout
        self.process: Optional[subprocess.Popen] = None
        self.log: list[str] = []

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "server", "--model", str(self.model_dir), "--host", "127.0.0.1",
                "--port", "0", "--metrics-port", "0", "--http-port", "0", "--device", "cpu",
                *self.server_settings.flags()]

    async def start(self) -> None:
        import grpc

        from attnserve.v1 import generation_pb2_grpc as pb_grpc

        self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready = threading.Event()
        ports: list[tuple[int, int]] = []

        def read_log():
            for line in self.process.stdout:
                self.log.append(line)
                match = READY.search(line)
                if match and not ports:
                    ports.append((int(match.group(1)), int(match.group(2))))
                    ready.set()
            ready.set()

        threading.Thread(target=read_log, daemon=True).start()
        await asyncio.to_thread(ready.wait, self.startup_timeout)
        if not ports:
            await self.stop()
            raise RuntimeError(f"{self.name}: the server did not start:\n" + "".join(self.log[-20:]))
        self.port, self.metrics_port = ports[0]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def stop(self) -> None:
        if getattr(self, "channel", None) is not None:
            await self.channel.close()
            self.channel = None
        await terminate(self.process)

    async def generate(self, request: BenchRequest, record: RequestRecord) -> None:
        from attnserve.v1 import generation_pb2 as pb

        message = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=request.prompt_token_ids),
                                     max_new_tokens=request.max_new_tokens, ignore_eos=True,
                                     request_id=f"bench-{request.index}")
        message.sampling.temperature = 0.0
        call = self.stub.GenerateStream(message)
        try:
            async for response in call:
                if response.token_ids:
                    now = time.perf_counter()
                    record.token_times.extend([now] * len(response.token_ids))
        finally:
            if not call.done():
                call.cancel()

    async def counters(self) -> dict[str, float]:
        text = await asyncio.to_thread(_metrics_text, self.metrics_port)
        return {
            "steps": metric_sum(text, "attnserve_engine_step_duration_seconds_count"),
            "step_seconds": metric_sum(text, "attnserve_engine_step_duration_seconds_sum"),
            "step_tokens": metric_sum(text, "attnserve_engine_step_tokens_sum"),
            "generated_tokens": metric_sum(text, "attnserve_generated_tokens_total"),
        }

    def server_cpu_seconds(self) -> Optional[float]:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def settings(self) -> dict:
        return {"command": " ".join(self.command[1:]), **self.server_settings.__dict__}


# --------------------------------------------------------------------------- attnserve in-process


class _StepCounter:
    """An EngineObserver that sums what every step reports (read from the engine thread, summed there)."""

    def __init__(self):
        self.totals = {"steps": 0, "step_seconds": 0.0, "step_tokens": 0, "prefill_tokens": 0,
                       "decode_tokens": 0, "calls": 0, "running": 0, "slots_in_use": 0}

    def on_step(self, report) -> None:
        t = self.totals
        t["steps"] += 1
        t["step_seconds"] += report.duration_s
        t["step_tokens"] += report.prefill_tokens + report.decode_tokens
        t["prefill_tokens"] += report.prefill_tokens
        t["decode_tokens"] += report.decode_tokens
        t["calls"] += report.calls
        t["running"] += report.running
        t["slots_in_use"] += report.slots_in_use

    def on_request_finished(self, report) -> None: ...

    def on_rejected(self, reason, protocol="grpc") -> None: ...

    def on_step_failed(self, error) -> None: ...

    def on_fatal(self, error) -> None: ...


def build_runner(model_dir: Path, card, kv_slots: int, capacity: int, intra_op_threads: int = 0,
                 intra_op_spinning: bool = False):
    """server.runner.ModelRunner on the CPU (imported here: systems that never use it need no onnxruntime)."""
    from server.runner import ModelRunner

    return ModelRunner(model_dir, card, kv_slots, capacity, "cpu", intra_op_threads,
                       intra_op_spinning=intra_op_spinning)


class AttnserveInProcess(System):
    name = "attnserve-inprocess"
    description = "server.engine.Engine in this process, no gRPC"

    def __init__(self, model_dir: Path, settings: ServerSettings, name: Optional[str] = None,
                 call_overhead_tokens: Optional[int] = None):
        self.model_dir = Path(model_dir)
        self.server_settings = settings
        self.name = name or self.name
        self.call_overhead_tokens = call_overhead_tokens
        self.engine = None

    async def start(self) -> None:
        from server.contract import ModelCard
        from server.engine import Engine, EngineConfig
        from server.prompts import load_tokenizer

        card = ModelCard.load(self.model_dir)
        s = self.server_settings
        capacity = min(s.max_seq_len, card.max_positions)
        runner = build_runner(self.model_dir, card, s.kv_slots, capacity, s.intra_op_threads, s.intra_op_spinning)
        extra = {} if self.call_overhead_tokens is None else {"call_overhead_tokens": self.call_overhead_tokens}
        self.observer = _StepCounter()
        self.engine = Engine(runner, load_tokenizer(self.model_dir), card, EngineConfig(
            kv_slots=s.kv_slots, max_seq_len=capacity, prefill_chunk_tokens=s.prefill_chunk_tokens,
            prefill_tokens_per_decode_row=s.prefill_tokens_per_decode_row,
            max_queued_requests=s.max_queued_requests, **extra), observer=self.observer)
        self.engine.start()

    async def stop(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, 30.0)
            self.engine = None

    async def generate(self, request: BenchRequest, record: RequestRecord) -> None:
        from server.types import GenerationRequest, SamplingParams

        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_update(update) -> None:  # the engine thread
            if update.token_ids:
                now = time.perf_counter()
                record.token_times.extend([now] * len(update.token_ids))
            if update.finished:
                loop.call_soon_threadsafe(_resolve, done, update)

        handle = self.engine.submit(GenerationRequest(
            request_id=f"bench-{request.index}", prompt_token_ids=list(request.prompt_token_ids),
            max_new_tokens=request.max_new_tokens, sampling=SamplingParams(temperature=0.0), ignore_eos=True,
        ), on_update)
        try:
            update = await done
        except asyncio.CancelledError:
            self.engine.cancel(handle)
            raise
        if update.error is not None:
            raise update.error

    async def counters(self) -> dict[str, float]:
        return dict(self.observer.totals) if self.engine is not None else {}

    async def settle(self) -> None:
        await asyncio.to_thread(self.engine.wait_idle, 60.0)

    def settings(self) -> dict:
        extra = {} if self.call_overhead_tokens is None else {"call_overhead_tokens": self.call_overhead_tokens}
        return {**self.server_settings.__dict__, **extra}


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


# --------------------------------------------------------------------------- static batches in a worker thread


@dataclass
class _Job:
    request: BenchRequest
    record: RequestRecord
    done: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False


class WorkerThreadSystem(System):
    """A system driven from one worker thread: generate() queues a job and awaits it.

    The worker takes jobs from `_jobs`, appends token times to their records and
    resolves `job.done` (None, or an error message); a job whose caller was cancelled
    has `cancelled` set, for the worker to drop. Subclasses set `totals` and implement
    `_working()` and the thread.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self.totals: dict[str, float] = {}

    def _working(self) -> bool:
        """True while the worker holds jobs it took from the queue."""
        raise NotImplementedError

    async def generate(self, request: BenchRequest, record: RequestRecord) -> None:
        loop = asyncio.get_running_loop()
        job = _Job(request, record, loop.create_future(), loop)
        self._jobs.put(job)
        try:
            error = await job.done
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if error is not None:
            raise RuntimeError(error)

    async def counters(self) -> dict[str, float]:
        return dict(self.totals)

    async def settle(self, timeout: float = 120.0) -> None:
        deadline = time.perf_counter() + timeout
        while (self._working() or not self._jobs.empty()) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)


class StaticBatchSystem(WorkerThreadSystem):
    """Runs batches of up to `concurrency` requests that start together and end together.

    A worker thread takes what is waiting (it waits up to `batch_window_s` for a full batch)
    and runs it to the longest request's length; each request completes as soon as its own
    tokens are out, but its row keeps being computed until the batch ends, as with
    transformers' generate. Subclasses implement run_batch().
    """

    batch_window_s = 0.02

    def __init__(self):
        super().__init__()
        self.max_batch = 1
        self._thread: Optional[threading.Thread] = None
        self._busy = False  # a batch is running
        self.totals = {"steps": 0, "rows": 0, "useful_rows": 0}

    def _working(self) -> bool:
        return self._busy

    def set_concurrency(self, concurrency: int) -> None:
        self.max_batch = concurrency

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        self._thread = threading.Thread(target=self._work, name=f"{self.name}-worker", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 120)
        await asyncio.to_thread(self.unload)

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def _take_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        deadline = None
        while len(batch) < self.max_batch and not self._stopping.is_set():
            timeout = 0.2 if deadline is None else deadline - time.perf_counter()
            if deadline is not None and timeout <= 0:
                break
            try:
                job = self._jobs.get(timeout=timeout)
            except queue.Empty:
                continue
            if not job.cancelled:
                self._busy = True
                batch.append(job)
                deadline = deadline or time.perf_counter() + self.batch_window_s
        return batch

    def _work(self) -> None:
        while not self._stopping.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            lengths = [job.request.max_new_tokens for job in batch]

            def emit(tokens_out: int) -> bool:
                """Record that every row now has `tokens_out` tokens; False once every job is cancelled."""
                now = time.perf_counter()
                self.totals["steps"] += 1
                self.totals["rows"] += len(batch)
                for job, length in zip(batch, lengths):
                    if tokens_out <= length:
                        self.totals["useful_rows"] += 1
                        job.record.token_times.append(now)
                        if tokens_out == length:
                            job.loop.call_soon_threadsafe(_resolve, job.done, None)
                return not all(job.cancelled for job in batch)

            try:
                self.run_batch([job.request for job in batch], emit)
            except Exception as e:  # a failed batch fails its requests, not the run
                for job in batch:
                    job.loop.call_soon_threadsafe(_resolve, job.done, f"{type(e).__name__}: {e}")
            finally:
                self._busy = False

    def run_batch(self, requests: list[BenchRequest], emit: Callable[[int], bool]) -> None:
        """Generate max(max_new_tokens) tokens per row greedily, calling emit(k) once the k-th token of every row exists."""
        raise NotImplementedError


def right_pad(rows: list[tuple[int, ...]], pad: int) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class TorchCachedLoop(StaticBatchSystem):
    """The from-scratch model's own cached loop: model.kv_cache.KVCache.step, one ragged prefill then one token a step."""

    name = "torch-eager"
    description = "PyTorch eager, model/kv_cache.py KVCache.step loop, static batches"

    def __init__(self, checkpoint: Path, threads: int):
        super().__init__()
        self.checkpoint = Path(checkpoint)
        self.threads = threads

    def load(self) -> None:
        import torch

        from model.checkpoint import load_checkpoint

        torch.set_num_threads(self.threads)
        self.model, self.config = load_checkpoint(self.checkpoint)

    def unload(self) -> None:
        self.model = None

    def run_batch(self, requests, emit) -> None:
        import torch

        from model.kv_cache import KVCache

        steps = max(r.max_new_tokens for r in requests)
        capacity = max(len(r.prompt_token_ids) for r in requests) + steps
        cache = KVCache(self.config, slots=len(requests), capacity=capacity)
        prompt = torch.from_numpy(right_pad([r.prompt_token_ids for r in requests], 0))
        lengths = torch.tensor([len(r.prompt_token_ids) for r in requests])
        with torch.inference_mode():
            logits = cache.step(self.model, prompt, lengths)
            ones = torch.ones(len(requests), dtype=torch.long)
            for k in range(1, steps + 1):
                tokens = logits.argmax(-1)  # (B,)
                if not emit(k) or k == steps:
                    return
                logits = cache.step(self.model, tokens[:, None], ones)


class TransformersGenerate(StaticBatchSystem):
    """transformers' generate with its own cache, on the GGUF the model dir was imported from."""

    name = "torch-eager"
    description = "PyTorch eager, transformers generate (DynamicCache), left-padded static batches"

    def __init__(self, gguf_path: Path, threads: int, pad_token_id: int):
        super().__init__()
        self.gguf_path = Path(gguf_path)
        self.threads = threads
        self.pad_token_id = pad_token_id

    def load(self) -> None:
        import torch
        import transformers

        torch.set_num_threads(self.threads)
        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(self.gguf_path.parent), gguf_file=self.gguf_path.name, dtype=torch.float32, local_files_only=True,
        ).eval()

    def unload(self) -> None:
        self.model = None

    def run_batch(self, requests, emit) -> None:
        import torch
        from transformers.generation.streamers import BaseStreamer

        steps = max(r.max_new_tokens for r in requests)
        width = max(len(r.prompt_token_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding, as generate expects for decoder-only models
            input_ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[i, width - len(r.prompt_token_ids):] = 1

        class Abort(Exception):
            pass

        class Streamer(BaseStreamer):
            def __init__(self):
                self.calls = 0

            def put(self, value):
                self.calls += 1
                if self.calls > 1 and not emit(self.calls - 1):  # the first call carries the prompt
                    raise Abort

            def end(self):
                pass

        try:
            with torch.inference_mode():
                self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=steps,
                                    min_new_tokens=steps, do_sample=False, pad_token_id=self.pad_token_id,
                                    streamer=Streamer())
        except Abort:
            pass


class OrtRecompute(StaticBatchSystem):
    """No KV cache: every token, our serving graph recomputes each row's whole sequence from position 0.

    Each call feeds prompt + generated tokens as one prefill (query_seqlens = the row's length,
    positions 0..len-1) into a scratch cache that nothing reads across calls: it is overwritten
    from offset 0 every time, so each token costs a full forward pass over the sequence.
    """

    name = "no-kv-cache"
    description = "our ONNX graph in onnxruntime, whole sequence recomputed every token, static batches"

    def __init__(self, model_dir: Path, capacity: int, max_batch: int, intra_op_threads: int = 0):
        super().__init__()
        self.model_dir = Path(model_dir)
        self.capacity = capacity
        self.slots = max_batch
        self.intra_op_threads = intra_op_threads

    def load(self) -> None:
        from server.contract import ModelCard

        card = ModelCard.load(self.model_dir)
        self.runner = build_runner(self.model_dir, card, self.slots, self.capacity, self.intra_op_threads)

    def unload(self) -> None:
        self.runner = None

    def run_batch(self, requests, emit) -> None:
        from server.runner import StepInputs

        steps = max(r.max_new_tokens for r in requests)
        sequences = [list(r.prompt_token_ids) for r in requests]
        for k in range(1, steps + 1):
            lengths = np.array([len(s) for s in sequences], dtype=np.int32)
            input_ids = right_pad([tuple(s) for s in sequences], 0)
            positions = np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape).astype(np.int64)
            logits = self.runner.step(StepInputs(input_ids, positions.copy(), lengths - 1, lengths))
            for s, token in zip(sequences, logits.argmax(-1)):
                s.append(int(token))
            if not emit(k):
                return


class GenaiGenerator(StaticBatchSystem):
    """onnxruntime-genai's Generator: a right-padded static batch (the padding masked), one token a step.

    genai 0.18 refuses a Generator batch_size above 32, so batches hold up to min(concurrency, 32).
    """

    name = "genai-generator"
    description = "onnxruntime-genai Generator, static batches of up to min(concurrency, 32)"
    max_batch_size = 32

    def set_concurrency(self, concurrency: int) -> None:
        self.max_batch = min(concurrency, self.max_batch_size)

    def __init__(self, model_dir: Path, pad_token_id: int):
        super().__init__()
        self.model_dir = Path(model_dir)
        self.pad_token_id = pad_token_id

    def load(self) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(self.model_dir))

    def unload(self) -> None:
        import gc

        self.model = None
        gc.collect()

    def run_batch(self, requests, emit) -> None:
        og = self.og
        steps = max(r.max_new_tokens for r in requests)
        prompt = right_pad([r.prompt_token_ids for r in requests], self.pad_token_id).astype(np.int32)
        total = prompt.shape[1] + steps
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=len(requests))
        generator = og.Generator(self.model, params)
        try:
            generator.append_tokens(prompt)
            for k in range(1, steps + 1):
                generator.generate_next_token()
                if not emit(k) or generator.is_done():
                    return
        finally:
            del generator


# --------------------------------------------------------------------------- onnxruntime-genai's Engine


class GenaiEngine(WorkerThreadSystem):
    """onnxruntime-genai's Engine, driven from one thread that owns it.

    On our non-paged graph the Engine runs static batches of up to 4 requests that
    start together (its dynamic batching needs a paged-attention graph), whatever
    the offered concurrency: that is the peer as it runs this model dir.
    """

    name = "genai-engine"
    description = "onnxruntime-genai Engine (its own scheduling)"

    def __init__(self, model_dir: Path):
        super().__init__()
        self.model_dir = Path(model_dir)
        self._active: dict[int, tuple[object, _Job]] = {}  # id(genai request) -> (request, job); engine thread only
        self.totals = {"steps": 0, "rows": 0}

    def _working(self) -> bool:
        return bool(self._active)

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="genai-engine", daemon=True)
        self._loaded = threading.Event()
        self._thread.start()
        await asyncio.to_thread(self._loaded.wait)
        if self._load_error:
            raise RuntimeError(self._load_error)

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._thread.join, 120)

    def _work(self) -> None:
        import gc

        self._load_error = None
        try:
            import onnxruntime_genai as og

            model = og.Model(str(self.model_dir))
            engine = og.Engine(model)
            events = engine.create_event_buffer(1024)
        except Exception as e:
            self._load_error = f"onnxruntime-genai cannot load {self.model_dir}: {e}"
            self._loaded.set()
            return
        self._loaded.set()
        active = self._active
        while not self._stopping.is_set():
            pending = engine.has_pending_requests()
            try:
                job = self._jobs.get(timeout=0.05) if not pending else self._jobs.get_nowait()
                while True:
                    request = engine.create_request()
                    options = og.TurnOptions(request)
                    options.set_max_generated_tokens(job.request.max_new_tokens)
                    options.set_min_generated_tokens(job.request.max_new_tokens)
                    options.set_do_sample(False)
                    request.begin_turn(np.array(job.request.prompt_token_ids, dtype=np.int32), options)
                    active[id(request)] = (request, job)
                    job = self._jobs.get_nowait()
            except queue.Empty:
                pass
            for request, job in active.values():
                if job.cancelled and not job.record.error:
                    job.record.error = "cancelled"
                    request.cancel_turn()
            if not engine.has_pending_requests():
                continue
            batch = engine.run(events)
            now = time.perf_counter()
            self.totals["steps"] += 1
            rows = 0
            for event in batch:
                entry = active.get(id(event.request))
                if entry is None:
                    continue
                request, job = entry
                if event.flags & og.EngineEventFlags.TOKEN:
                    rows += 1
                    job.record.token_times.append(now)
                if event.flags & (og.EngineEventFlags.TURN_FINISHED | og.EngineEventFlags.FAILED):
                    failed = bool(event.flags & og.EngineEventFlags.FAILED)
                    job.loop.call_soon_threadsafe(
                        _resolve, job.done, f"genai failed: {event.error_code}" if failed and not job.cancelled else None)
                    del active[id(event.request)]
                    request.close()
            self.totals["rows"] += rows
        for request, job in active.values():
            request.close()
            job.loop.call_soon_threadsafe(_resolve, job.done, "stopped")
        del events, engine, model
        gc.collect()
