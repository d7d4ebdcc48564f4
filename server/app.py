"""Wires the server together and runs it until SIGTERM or SIGINT.

    ServerConfig ─► ModelCard + ModelRunner (onnxruntime, KV buffers) ─► Engine thread
                                                                            ▲ submit / cancel
    grpc.aio server: Generation service, grpc.health.v1.Health, reflection ─┤
                                                                            ▼ embed / classify
                    encoder and image-classifier dirs ─► BatchedModel: a session and batch thread each
                    (server/encoders.py), named in the registry ServedModels (server/models.py)
        and inference.GRPCInferenceService (KServe v2, server/kserve.py) on the same port
        (TLS or mutual TLS and API keys from server/security.py, when configured)
    prometheus /metrics (server/metrics.py observes the engine; TLS like gRPC)
    OpenAI-compatible HTTP API (server/http_api.py, aiohttp on the same loop; --http-port, 0 = off)
    optional plaintext health-only listener (--health-port) for probes that cannot speak mutual TLS

Shutdown: health turns NOT_SERVING, new requests get UNAVAILABLE, accepted
requests finish within --drain-grace-seconds, then the process exits 0. An
engine that breaks (repeated step failures) turns health NOT_SERVING and the
process exits 1 so the orchestrator restarts it.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from server import contract
from server.contract import KIND_DECODER, ModelCard
from server import images, metrics
from server.config import ServerConfig
from server.encoders import BatchedModel, BatchSettings
from server.engine import Engine, EngineConfig
from server.faults import FaultInjectingRunner, parse_fault_spec
from server.kv_buffers import CacheShape
from server.inspection import Inspection, InspectionLimits
from server.models import DecoderModel, ServedModels
from server.prompts import PromptCodec, load_tokenizer
from server.grpc_auth import ApiKeyInterceptor
from server import http_api
from server import kserve
from server import probe
from server.runner import ModelRunner, StepInputs
from server.security import Security, SecurityError
from server.service import SERVICE_DESCRIPTOR, SERVICE_NAME, GenerationService
from server.types import ServedModel
from server.validation import Limits

log = logging.getLogger("attnserve")
BROKEN_NOT_SERVING_SECONDS = 1.0


class StartupError(Exception):
    """The server cannot start; the message is the one line it prints before exiting non-zero."""


class ClientLeftMidSendFilter(logging.Filter):
    """grpc logs a client that leaves while a streamed message waits for HTTP/2 flow control (a slow
    reader that gives up) as an ERROR with a traceback, "ExecuteBatchError raised in core by servicer
    method". With slow clients that is routine and the request is cancelled as usual: keep one INFO line."""

    PREFIX = "ExecuteBatchError raised in core by servicer method "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            record.msg = f"a client left while a streamed message waited to be sent: {message[len(self.PREFIX):]}"
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def package_version() -> str:
    try:
        return version("attnserve")
    except PackageNotFoundError:
        return "dev"


def split_model_dirs(model_dirs) -> tuple[Path, list[Path]]:
    """(the decoder's dir, the other dirs), each dir's kind read from its card."""
    decoders, others = [], []
    for model_dir in model_dirs:
        if not Path(model_dir).is_dir():
            raise StartupError(f"model dir {model_dir} does not exist; build one with `python -m export` "
                               "(or `make model`)")
        if not (Path(model_dir) / contract.CARD_FILE).is_file():
            raise StartupError(f"model dir {model_dir} has no {contract.CARD_FILE}; re-export it with "
                               "`python -m export`")
        try:
            kind = contract.card_kind(model_dir)
        except ValueError as e:
            raise StartupError(f"{model_dir}/{contract.CARD_FILE} is unreadable: {e}") from None
        (decoders if kind == KIND_DECODER else others).append(Path(model_dir))
    if len(decoders) > 1:
        raise StartupError(f"--model names {len(decoders)} decoder dirs ({', '.join(map(str, decoders))}); a server "
                           "serves one decoder: run one server per decoder")
    if not decoders:
        # Metrics, the HTTP API and KServe v2 are built around the decoder's engine.
        raise StartupError(f"--model names no decoder dir (only {', '.join(map(str, others))}); this server needs "
                           "one decoder beside its encoders and image classifiers")
    return decoders[0], others


def load_batched_models(model_dirs: list[Path], config: ServerConfig, observer) -> list[BatchedModel]:
    settings = BatchSettings(
        window_seconds=config.batch_window_ms / 1000, max_batch=config.max_batch,
        max_batch_tokens=config.max_batch_tokens, max_inputs_per_request=config.max_inputs_per_request,
        intra_op_threads=config.encoder_intra_op_threads)
    models = []
    for model_dir in model_dirs:
        try:
            models.append(BatchedModel(model_dir, settings, observer))
        except Exception as e:  # onnxruntime, tokenizers and the card's checks raise their own types
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise StartupError(f"cannot serve {model_dir}: {reason}") from None
        model = models[-1]
        observer.add_batched_model(model.name, model.kind, model.card.dtype, model.provider,
                                   lambda model=model: model.queued_inputs)
    return models


def load_card(model_dir: Path) -> ModelCard:
    if not Path(model_dir).is_dir():
        raise StartupError(f"model dir {model_dir} does not exist; build one with `python -m export` (or `make model`)")
    for name in (contract.MODEL_FILE, contract.CARD_FILE, contract.TOKENIZER_FILE):
        if not (Path(model_dir) / name).is_file():
            raise StartupError(f"model dir {model_dir} has no {name}; re-export it with `python -m export`")
    try:
        return ModelCard.load(model_dir)
    except (ValueError, TypeError) as e:
        raise StartupError(f"{model_dir}/{contract.CARD_FILE} is unreadable: {e}") from None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_kv_memory(shape: CacheShape, device: str) -> None:
    """Refuse at once a KV cache that cannot fit, rather than dying later in the allocator or the OOM killer."""
    available = available_memory_bytes() if device != "cuda" else None
    if available is not None and shape.total_bytes > 0.9 * available:
        raise StartupError(
            f"--kv-slots {shape.slots} x --max-seq-len {shape.capacity} needs {shape.total_bytes / 2**30:.1f} GiB of KV "
            f"cache ({shape.bytes_per_token // 1024} KiB per token) but only {available / 2**30:.1f} GiB of memory is "
            "available; lower --kv-slots or --max-seq-len"
        )


def check_model_runs(runner: ModelRunner, card: ModelCard, model_dir: Path) -> None:
    """Run the graph once, one token into slot 0, so a graph that disagrees with its model card fails at
    startup rather than on the first request. Harmless: a request reads only the cache positions it wrote."""
    try:
        logits = runner.step(StepInputs(
            input_ids=np.ones((1, 1), dtype=np.int64), position_ids=np.zeros((1, 1), dtype=np.int64),
            seqlens_k=np.zeros(1, dtype=np.int32), query_seqlens=np.ones(1, dtype=np.int32),
        ))
    except Exception as e:
        raise StartupError(
            f"{model_dir}/{contract.MODEL_FILE} does not run with the KV cache its model card describes "
            f"({card.n_layers} layers x {card.n_kv_heads} KV heads x head dim {card.head_dim}, {card.dtype}): "
            f"{' '.join(str(e).split())[:300] or type(e).__name__}; re-export the model dir"
        ) from None
    if logits.shape != (1, card.vocab_size):
        raise StartupError(
            f"{model_dir}/{contract.MODEL_FILE} returns logits of shape {list(logits.shape)} for one token, but its "
            f"model card says vocab_size {card.vocab_size}; re-export the model dir"
        )


@dataclass
class Server:
    """A started server; tests drive it through these handles."""

    grpc_server: grpc.aio.Server
    port: int
    metrics_port: int
    engine: Engine
    health: health_aio.HealthServicer
    config: ServerConfig
    broken: asyncio.Event  # set once the engine has broken for good
    security: Security
    health_server: Optional[grpc.aio.Server] = None  # the plaintext health-only listener, if any
    health_port: int = -1
    http_runner: Optional[object] = None  # the OpenAI-compatible HTTP API's aiohttp AppRunner, if on
    http_port: int = 0  # 0 = off
    serving: bool = False  # what grpc health says; /health reads it
    inspection: Optional[Inspection] = None  # InspectAttention's session and worker (server/inspection.py)
    models: Optional[ServedModels] = None  # every model served by name: the decoder, encoders, image classifiers

    async def stop_listeners(self, grace: float) -> None:
        self.security.stop_reloading()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.health_server is not None:
            await self.health_server.stop(grace=grace)
        await self.grpc_server.stop(grace=grace)

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        # Each model's name too, so that a probe can ask for one model (`grpc_health_probe -service NAME`).
        for service in ("", SERVICE_NAME, kserve.SERVICE_NAME, *(self.models.names if self.models else ())):
            await self.health.set(service, status)

    async def drain_and_stop(self) -> None:
        """Refuse new work, let accepted requests finish (bounded by the grace period), then stop."""
        await self.set_serving(False)
        self.engine.begin_drain()
        if self.models is not None:
            self.models.begin_drain()
        grace = self.config.drain_grace_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        finished = await loop.run_in_executor(None, self.engine.wait_idle, grace)
        if self.models is not None:
            models_idle = await loop.run_in_executor(None, self.models.wait_idle, max(deadline - loop.time(), 0))
            finished = finished and models_idle
        if not finished:
            log.warning("drain grace of %.0f s passed; cancelling the requests still running", grace)
        await loop.run_in_executor(None, self.engine.stop)
        if self.models is not None:
            await loop.run_in_executor(None, self.models.stop)
        if self.inspection is not None:
            self.inspection.stop()
        await self.stop_listeners(grace=1.0)


async def start_server(config: ServerConfig) -> Server:
    try:
        security = Security(config)
    except SecurityError as e:
        raise StartupError(str(e)) from None
    decoder_dir, other_dirs = split_model_dirs(config.model)
    card = load_card(decoder_dir)
    capacity = min(config.max_seq_len, card.max_positions)
    check_kv_memory(CacheShape(card.n_layers, config.kv_slots, card.n_kv_heads, capacity, card.head_dim, card.dtype),
                    config.device)
    try:
        runner = ModelRunner(decoder_dir, card, config.kv_slots, capacity, config.device, config.intra_op_threads,
                             intra_op_spinning=config.intra_op_spinning == "on")
    except Exception as e:
        raise StartupError(str(e)) from None
    check_model_runs(runner, card, decoder_dir)
    try:
        probe.check_at_startup(runner, card, decoder_dir, capacity, log)
    except probe.ProbeError as e:
        raise StartupError(str(e)) from None
    if config.fault_injection:
        log.warning("--fault-injection %s: model runs will fail on purpose (reliability tests only)",
                    config.fault_injection)
        runner = FaultInjectingRunner(runner, parse_fault_spec(config.fault_injection))
    try:
        tokenizer = load_tokenizer(decoder_dir)
        codec = PromptCodec(tokenizer, card)
    except Exception as e:  # the tokenizers library and jinja raise their own types
        raise StartupError(f"cannot load the tokenizer or chat template of {decoder_dir}: {e}") from None
    observer = metrics.Metrics(card, runner.provider, package_version(), config.kv_slots, capacity,
                               max_queued_requests=config.max_queued_requests)
    observer.init_grpc_service(SERVICE_DESCRIPTOR)
    observer.init_grpc_service(kserve.SERVICE_DESCRIPTOR)
    observer.add_protocol(kserve.PROTOCOL)
    images.limit_pillow(config.max_image_pixels)
    try:
        models = ServedModels(DecoderModel(config.served_model_name or card.name, card),
                              load_batched_models(other_dirs, config, observer),
                              images.ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels))
    except ValueError as e:  # two dirs of one name
        raise StartupError(str(e)) from None
    # The engine thread reports a fatal break; the event loop that serve() waits on learns of it.
    broken = asyncio.Event()
    loop = asyncio.get_running_loop()
    engine = Engine(runner, tokenizer, card, EngineConfig(
        kv_slots=config.kv_slots, max_seq_len=capacity, prefill_chunk_tokens=config.prefill_chunk_tokens,
        prefill_tokens_per_decode_row=config.prefill_tokens_per_decode_row,
        max_queued_requests=config.max_queued_requests, stream_buffer_tokens=config.stream_buffer_tokens,
        uniform_calls=runner.call_plan == "uniform",
    ), observer=observer, on_fatal=lambda error: loop.call_soon_threadsafe(broken.set))
    limits = Limits(
        context=capacity, vocab_size=card.vocab_size, default_max_new_tokens=config.default_max_new_tokens,
        max_new_tokens_limit=config.max_new_tokens_limit, max_stop_strings=config.max_stop_strings,
        max_stop_string_length=config.max_stop_string_length, max_logprobs=config.max_logprobs,
        max_prompt_chars=codec.max_prompt_chars(capacity),
    )
    served = ServedModel(
        name=models.decoder.name, architecture=card.architecture, dtype=card.dtype, execution_provider=runner.provider,
        vocab_size=card.vocab_size, max_positions=card.max_positions, max_seq_len=capacity,
        kv_slots=config.kv_slots, max_new_tokens_limit=config.max_new_tokens_limit,
        has_chat_template=codec.has_chat_template, max_stop_strings=config.max_stop_strings,
        max_stop_string_length=config.max_stop_string_length, max_logprobs=config.max_logprobs,
        version=package_version(),
    )
    inspection = Inspection(decoder_dir, card, InspectionLimits(
        max_tokens=config.inspection_max_tokens, max_generated_tokens=config.inspection_max_generated_tokens,
        max_floats=config.inspection_max_floats, max_queued=config.inspection_max_queued),
        intra_op_threads=config.inspection_intra_op_threads)
    service = GenerationService(engine, codec, limits, served, config.stream_stall_timeout_seconds,
                                inspection=inspection, models=models)

    # The metrics interceptor comes first, so it also counts the calls the API-key check refuses.
    interceptors = [observer.grpc_interceptor()]
    if security.keys is not None:
        interceptors.append(ApiKeyInterceptor(security.keys, security.open_services, observer.on_api_key_checked))
    grpc_server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            # Clients balancing over a headless Service's DNS records re-resolve when a connection
            # ends: closing each one after 5 minutes (calls in flight finish) lets them find new pods.
            ("grpc.max_connection_age_ms", 5 * 60 * 1000),
        ],
    )
    grpc_server.add_generic_rpc_handlers((service.handler(),))
    # KServe v2 clients on the same port; ready means what grpc health says (the Server made below).
    server: Optional[Server] = None
    inference = kserve.InferenceService(service, config.served_model_name or card.name, package_version(),
                                        serving=lambda: server is not None and server.serving, models=models)
    grpc_server.add_generic_rpc_handlers((inference.handler(),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, kserve.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        grpc_server,
    )
    try:
        port = security.add_port(grpc_server, f"{config.host}:{config.port}")
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {config.host}:{config.port} ({e}); is the port in use?") from None
    try:
        metrics_port = observer.serve(config.host, config.metrics_port, security.http_ssl_context(),
                                      security.metrics_key_check()) if config.metrics_port >= 0 else -1
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {config.host}:{config.metrics_port} ({e.strerror or e}); "
                           "is the port in use?") from None
    health_server, health_port = None, -1
    if config.health_port >= 0:
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)  # the same servicer: the same status
        try:
            health_port = health_server.add_insecure_port(f"{config.host}:{config.health_port}")
        except RuntimeError as e:
            raise StartupError(f"cannot listen on {config.host}:{config.health_port} for health ({e}); "
                               "is the port in use?") from None
    engine.start()
    models.start()
    await grpc_server.start()
    if health_server is not None:
        await health_server.start()
    security.start_reloading()
    server = Server(grpc_server, port, metrics_port, engine, health, config, broken, security, health_server,
                    health_port)
    server.inspection = inspection
    server.models = models
    if config.http_port:
        api = http_api.HttpApi(service, http_api.HttpSettings(
            served_name=config.served_model_name or card.name, max_request_bytes=config.max_request_bytes,
            serving=lambda: server.serving, keys=security.keys, on_api_key_checked=observer.on_api_key_checked,
            on_request=observer.on_http_request, exposition=observer.exposition,
            metrics_key_check=security.metrics_key_check()))
        try:
            server.http_runner = await http_api.start(api, config.host, config.http_port, security.http_ssl_context())
        except OSError as e:
            await server.stop_listeners(grace=0)
            await loop.run_in_executor(None, engine.stop)
            await loop.run_in_executor(None, models.stop)
            raise StartupError(f"cannot serve the HTTP API on {config.host}:{config.http_port} "
                               f"({e.strerror or e}); is the port in use?") from None
        server.http_port = config.http_port
    await server.set_serving(True)
    return server


def describe_batched(models: Optional[ServedModels]) -> str:
    """The ready line's part for the encoders and image classifiers: ", also NAME (kind, ...), ..." or nothing."""
    described = []
    for model in (models.batched.values() if models else ()):
        card = model.card
        size = (f"{card.embedding_dim} dims, {card.max_tokens} tokens" if model.kind == contract.KIND_ENCODER
                else f"{len(card.labels)} labels")
        described.append(f"{model.name} ({model.kind}, {size}, {model.provider})")
    return ", also " + ", ".join(described) if described else ""


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after draining) or until the engine breaks (exit 1)."""
    logging.getLogger("grpc._cython.cygrpc").addFilter(ClientLeftMidSendFilter())
    server = await start_server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "attnserve ready: grpc %s:%d, metrics %s, health %s, %s, model %s (%s, %s), %d KV slots x %d tokens%s, http %s",
        config.host, server.port, server.metrics_port if server.metrics_port >= 0 else "off",
        server.health_port if server.health_port >= 0 else "on the grpc port", server.security.mode,
        server.engine.card.name, server.engine.runner.provider, server.engine.card.dtype,
        config.kv_slots, server.engine.config.max_seq_len, describe_batched(server.models), server.http_port or "off",
    )
    done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), asyncio.create_task(server.broken.wait())],
                                 return_when=asyncio.FIRST_COMPLETED)
    if server.broken.is_set():
        log.error("engine broken (%s); exiting so the orchestrator restarts the server", server.engine.broken)
        await server.set_serving(False)
        # For a moment health answers NOT_SERVING (and Generate UNAVAILABLE, which clients retry), so
        # probes and load balancers learn why before the process is gone; stop() refuses new RPCs at once.
        await asyncio.sleep(BROKEN_NOT_SERVING_SECONDS)
        await server.stop_listeners(grace=1.0)
        return 1
    log.info("shutting down: draining accepted requests (grace %.0f s)", config.drain_grace_seconds)
    await server.drain_and_stop()
    log.info("stopped")
    return 0
