"""The encoder and image-classifier systems under test (bench/embeddings.py drives them).

    text   attnserve-embed        `python -m server` subprocess, one Embed per text over grpc.aio   (concurrent)
           sentence-transformers  SentenceTransformer.encode(the c waiting texts, batch_size=c)     (rounds)
           ort-per-request        one onnxruntime session, one text per run, from c threads          (threads)
    image  attnserve-classify     the same server, one Classify per PNG over grpc.aio               (concurrent)
           torch-eager            the checkpoint in PyTorch, the c waiting PNGs per forward pass     (rounds)

How a system is driven is its `drive`: "concurrent" systems offer `async call(item)`, "threads"
systems a blocking `call(item)` run from c threads, "rounds" systems a blocking `call_batch(items)`
handed c items at a time; each is a closed loop of c clients (drive()). Every system does the whole job a client's request asks for: text in,
tokenized, embedded; PNG bytes in, decoded, preprocessed, classified.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Optional, Sequence

import numpy as np

from bench.systems import READY, AttnserveGrpc, _metrics_text
from server import contract

EMBED, CLASSIFY = "embed", "classify"


class EncoderSystem:
    name = "system"
    description = ""
    task = EMBED
    drive = "concurrent"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def server_cpu_seconds(self) -> Optional[float]:
        """CPU time (user + system) of a server subprocess so far; None when the system runs in this process."""
        return None

    async def counters(self) -> dict[str, float]:
        """Cumulative batch-run counters (runs, inputs, padded tokens...), read before and after a point."""
        return {}

    def settings(self) -> dict:
        return {}


class InProcessSystem(EncoderSystem):
    """A peer that runs in this process: start() loads it (_load) off the event loop."""

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        raise NotImplementedError


class AttnserveModel(EncoderSystem):
    """One model of the attnserve server subprocess, called over its gRPC channel."""

    def __init__(self, server: "AttnserveServer", model_name: str):
        self.server = server
        self.model_name = model_name
        self.info: dict = {}

    async def start(self) -> None:
        self.info = await self.server.model_info(self.model_name)

    def server_cpu_seconds(self) -> float:
        return self.server.server_cpu_seconds()

    async def counters(self) -> dict[str, float]:
        return await self.server.batch_counters(self.model_name)


# --------------------------------------------------------------------------- closed loops


@dataclass
class Measured:
    """One measured point: each finished input's latency, and the window they finished in."""

    latencies_s: list[float] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    truncated: bool = False  # the time cap came before every input was sent


async def closed_loop_concurrent(call: Callable[[object], Awaitable], items: Sequence, concurrency: int,
                                 time_cap_s: float) -> Measured:
    """`concurrency` client tasks; each sends its next input the moment its previous one is answered."""
    out = Measured(started=time.perf_counter())
    deadline = out.started + time_cap_s
    pending = iter(items)

    async def client():
        for item in pending:
            if time.perf_counter() > deadline:
                out.truncated = True
                return
            out.sent += 1
            sent = time.perf_counter()
            try:
                await call(item)
            except Exception as e:  # a failed request is reported, not fatal to the run
                out.errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            out.latencies_s.append(time.perf_counter() - sent)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    out.ended = time.perf_counter()
    return out


def closed_loop_threads(call: Callable[[object], object], items: Sequence, concurrency: int,
                        time_cap_s: float) -> Measured:
    """The same closed loop from `concurrency` threads calling a blocking `call`."""
    out = Measured(started=time.perf_counter())
    deadline = out.started + time_cap_s
    pending = iter(items)
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                item = next(pending, None)
                if item is None:
                    return
                if time.perf_counter() > deadline:
                    out.truncated = True
                    return
                out.sent += 1
            sent = time.perf_counter()
            try:
                call(item)
            except Exception as e:
                with lock:
                    out.errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            latency = time.perf_counter() - sent
            with lock:
                out.latencies_s.append(latency)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.ended = time.perf_counter()
    return out


def closed_loop_rounds(call_batch: Callable[[list], object], items: Sequence, concurrency: int,
                       time_cap_s: float) -> Measured:
    """A batching peer behind the same c clients: each round takes the c waiting inputs as one call, and
    every input of a round waits for the whole round (its latency is the round's time)."""
    out = Measured(started=time.perf_counter())
    deadline = out.started + time_cap_s
    for start in range(0, len(items), concurrency):
        if time.perf_counter() > deadline:
            out.truncated = True
            break
        batch = list(items[start:start + concurrency])
        out.sent += len(batch)
        sent = time.perf_counter()
        try:
            call_batch(batch)
        except Exception as e:
            out.errors.extend([f"{type(e).__name__}: {e}"[:300]] * len(batch))
            continue
        out.latencies_s.extend([time.perf_counter() - sent] * len(batch))
    out.ended = time.perf_counter()
    return out


async def drive(system: EncoderSystem, items: Sequence, concurrency: int, time_cap_s: float) -> Measured:
    if system.drive == "concurrent":
        return await closed_loop_concurrent(system.call, items, concurrency, time_cap_s)
    if system.drive == "threads":
        return await asyncio.to_thread(closed_loop_threads, system.call, items, concurrency, time_cap_s)
    return await asyncio.to_thread(closed_loop_rounds, system.call_batch, items, concurrency, time_cap_s)


# --------------------------------------------------------------------------- attnserve


class AttnserveServer(AttnserveGrpc):
    """One `python -m server` serving the encoder (and the classifier) dirs, with a decoder dir when it needs one.

    Started, read and stopped as bench/systems.py's attnserve-grpc is; its onnxruntime sessions get
    `threads` intra-op threads, the peers' count, and the batching flags are the server's defaults
    unless `extra_flags` sets them.
    """

    name = "attnserve"

    def __init__(self, model_dirs: list[Path], threads: int, decoder_dir: Optional[Path] = None,
                 extra_flags: tuple[str, ...] = (), startup_timeout: float = 300.0):
        super().__init__(Path(model_dirs[0]), settings=None, startup_timeout=startup_timeout)
        self.model_dirs = [Path(d) for d in model_dirs]
        self.decoder_dir = decoder_dir
        self.threads = threads
        self.extra_flags = tuple(extra_flags)

    @property
    def command(self) -> list[str]:
        dirs = ([self.decoder_dir] if self.decoder_dir else []) + self.model_dirs
        models = [arg for d in dirs for arg in ("--model", str(d))]
        return [sys.executable, "-m", "server", *models, "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "0", "--http-port", "0", "--device", "cpu",
                "--intra-op-threads", str(self.threads), "--encoder-intra-op-threads", str(self.threads),
                *self.extra_flags]

    async def model_info(self, name: str) -> dict:
        """What the server says of one model it serves: kind, limits and its batching settings."""
        from google.protobuf.json_format import MessageToDict

        from attnserve.v1 import generation_pb2 as pb

        info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(name=name))
        keys = ("name", "kind", "embeddingDim", "maxInputTokens", "labels", "batchWindowMs", "maxBatch",
                "maxBatchTokens", "maxQueuedInputs", "maxInputsPerRequest", "executionProvider")
        return {k: v for k, v in MessageToDict(info).items() if k in keys}

    async def batch_counters(self, model: str) -> dict[str, float]:
        """The server's batch-run totals for one model, from its /metrics."""
        text = await asyncio.to_thread(_metrics_text, self.metrics_port)

        def total(name: str) -> float:
            label = f'model="{model}"'
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(name + "{") and label in line.split("}", 1)[0])

        return {"runs": total("attnserve_batch_run_inputs_count"), "run_inputs": total("attnserve_batch_run_inputs_sum"),
                "padded_tokens": total("attnserve_batch_run_padded_tokens_sum"),
                "run_seconds": total("attnserve_batch_run_duration_seconds_sum")}

    def ready_line(self) -> str:
        return next((line.strip() for line in self.log if READY.search(line)), "")

    def settings(self) -> dict:
        return {"command": " ".join(self.command[1:]), "intra_op_threads": self.threads,
                "decoder_dir": str(self.decoder_dir) if self.decoder_dir else None, "ready_line": self.ready_line()}


class AttnserveEmbed(AttnserveModel):
    name = "attnserve-embed"
    description = "python -m server (subprocess), one Embed per text over one grpc.aio channel, its dynamic batching"
    task = EMBED

    def __init__(self, server: AttnserveServer, model_name: str):
        super().__init__(server, model_name)
        self.tokens = 0  # in every text embedded so far

    async def call(self, text: str) -> np.ndarray:
        return (await self.embed_many([text]))[0]

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        from attnserve.v1 import generation_pb2 as pb

        # truncate: as the peers do (sentence-transformers at its max_seq_length, the plain session at the card's)
        response = await self.server.stub.Embed(pb.EmbedRequest(model=self.model_name, texts=texts, truncate=True))
        self.tokens += response.prompt_tokens
        return np.array([e.values for e in response.embeddings], dtype=np.float32)  # (N, D)

    async def counters(self) -> dict[str, float]:
        # tokens: what the texts hold (special tokens included), against which padded_tokens shows the padding
        return {**await super().counters(), "tokens": self.tokens}

    def settings(self) -> dict:
        return {"model": self.model_name, "truncate": True, "model_info": self.info, **self.server.settings()}


class AttnserveClassify(AttnserveModel):
    name = "attnserve-classify"
    description = "the same server, one Classify per PNG over the same grpc.aio channel, its dynamic batching"
    task = CLASSIFY

    def __init__(self, server: AttnserveServer, model_name: str, n_labels: int):
        super().__init__(server, model_name)
        self.n_labels = n_labels

    async def call(self, png: bytes) -> np.ndarray:
        from attnserve.v1 import generation_pb2 as pb

        request = pb.ClassifyRequest(model=self.model_name, images=[pb.Image(encoded=png)], top_k=0)
        response = await self.server.stub.Classify(request)
        probabilities = np.zeros(self.n_labels, dtype=np.float32)  # (n_labels,), in label order
        for label in response.results[0].labels:
            probabilities[label.index] = label.probability
        return probabilities

    def settings(self) -> dict:
        return {"model": self.model_name, "top_k": 0, "model_info": self.info, **self.server.settings()}


# --------------------------------------------------------------------------- sentence-transformers


class SentenceTransformersRounds(InProcessSystem):
    """sentence-transformers as its users run it, handed the texts of the c waiting requests as one encode call."""

    name = "sentence-transformers"
    description = "SentenceTransformer(device='cpu').encode(texts of the c waiting requests, batch_size=c), rounds"
    task = EMBED
    drive = "rounds"

    def __init__(self, model_path: Path, threads: int):
        self.model_path = Path(model_path)
        self.threads = threads

    def _load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(self.threads)
        self.model = SentenceTransformer(str(self.model_path), device="cpu")

    def call_batch(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=len(texts), show_progress_bar=False)  # (c, D)

    def settings(self) -> dict:
        from importlib.metadata import version

        return {"model_path": str(self.model_path), "torch_threads": self.threads, "device": "cpu",
                "max_seq_length": self.model.max_seq_length, "modules": [type(m).__name__ for m in self.model],
                "sentence_transformers": version("sentence-transformers"), "torch": version("torch")}


# --------------------------------------------------------------------------- a plain onnxruntime session


class OrtPerRequest(InProcessSystem):
    """The encoder dir's model.onnx in one onnxruntime session, shared by c threads that each run one text.

    No batching: each call is input_ids/attention_mask/token_type_ids of shape (1, T), tokenized with
    the dir's tokenizer.json in the calling thread. onnxruntime's own defaults otherwise.
    """

    name = "ort-per-request"
    description = "one onnxruntime session shared by c threads, one text per run (no batching)"
    task = EMBED
    drive = "threads"

    def __init__(self, encoder_dir: Path, threads: int):
        self.encoder_dir = Path(encoder_dir)
        self.threads = threads

    def _load(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        card = contract.EncoderCard.load(self.encoder_dir)
        self.tokenizer = Tokenizer.from_file(str(self.encoder_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(card.max_tokens)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(self.encoder_dir / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])

    def call(self, text: str) -> np.ndarray:
        encoding = self.tokenizer.encode(text)
        feeds = {contract.INPUT_IDS: np.array([encoding.ids], dtype=np.int64),  # (1, T)
                 contract.ATTENTION_MASK: np.array([encoding.attention_mask], dtype=np.int64),  # (1, T)
                 contract.TOKEN_TYPE_IDS: np.array([encoding.type_ids], dtype=np.int64)}  # (1, T)
        return self.session.run([contract.EMBEDDINGS], feeds)[0][0]  # (D,)

    def settings(self) -> dict:
        from importlib.metadata import version

        return {"model": str(self.encoder_dir / "model.onnx"), "sessions": 1, "intra_op_num_threads": self.threads,
                "inter_op_num_threads": 1, "execution_mode": "sequential", "caller_threads": "c (the concurrency)",
                "spinning": "onnxruntime default (on)", "tokenizer": "the dir's tokenizer.json, in the calling thread",
                "onnxruntime": version("onnxruntime")}


# --------------------------------------------------------------------------- PyTorch eager on the ViT checkpoint


def decode_pixels(pngs: list[bytes], image: dict) -> np.ndarray:
    """PNG bytes -> float32 (N, C, H, W) by the server's own decoding and preprocessing (server/images.py) of the
    card's `image` dict: the same computation on both sides of the comparison."""
    from server import images

    limits = images.ImageLimits(max_bytes=max(map(len, pngs)), max_pixels=2 ** 31)
    decoded = [images.decode(png, limits, f"images[{i}]") for i, png in enumerate(pngs)]  # uint8 (H, W, C) each
    return images.preprocess(decoded, images.ImageSpec.from_card(image))


class TorchVitRounds(InProcessSystem):
    """The ViT checkpoint in PyTorch eager (model/ code), the c waiting PNGs decoded and classified in one forward.

    Preprocessing is the checkpoint's own `image` dict, the one its model dir's card copies.
    """

    name = "torch-eager"
    description = "the checkpoint in PyTorch eager (model/transformer.py), the c waiting images per forward, rounds"
    task = CLASSIFY
    drive = "rounds"

    def __init__(self, checkpoint: Path, threads: int):
        self.checkpoint = Path(checkpoint)
        self.threads = threads

    def _load(self) -> None:
        import torch

        from model.digits import load_classifier_checkpoint

        torch.set_num_threads(self.threads)
        self.model, meta = load_classifier_checkpoint(self.checkpoint)
        self.image = meta["image"]

    def call_batch(self, pngs: list[bytes]) -> np.ndarray:
        import torch

        pixels = torch.from_numpy(decode_pixels(pngs, self.image))  # (c, C, H, W)
        with torch.inference_mode():
            logits = self.model.classify(pixels)  # (c, n_labels)
        return torch.softmax(logits, dim=-1).numpy()

    def settings(self) -> dict:
        from importlib.metadata import version

        return {"checkpoint": str(self.checkpoint), "torch_threads": self.threads, "device": "cpu",
                "preprocessing": {"decode": "Pillow", **self.image}, "torch": version("torch")}
