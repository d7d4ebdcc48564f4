"""The server's one configuration object, loaded once from CLI flags with environment fallbacks.

Every field is a flag `--name-with-dashes` and an environment variable
`ATTNSERVE_NAME_IN_CAPS`; a flag beats the variable, the variable beats the
default. Nothing is read at import time.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from server.faults import parse_fault_spec

ENV_PREFIX = "ATTNSERVE_"


def _option(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class ServerConfig:
    model: tuple[Path, ...] = _option(
        (), "model dir written by `python -m export` (required); repeat it to serve encoders and image classifiers "
        "beside the decoder, one decoder at most (the variable: dirs separated by commas)")
    host: str = _option("0.0.0.0", "address to bind the gRPC and metrics servers to")
    port: int = _option(50051, "gRPC port; 0 picks a free one (logged at start)")
    metrics_port: int = _option(9090, "Prometheus /metrics port; 0 picks a free one, -1 disables it")
    kv_slots: int = _option(16, "requests decoded at once: one preallocated KV cache row each")
    max_seq_len: int = _option(2048, "tokens per KV slot (prompt + generated); capped by the model's context")
    prefill_chunk_tokens: int = _option(256, "prompt tokens computed per engine step, across requests")
    prefill_tokens_per_decode_row: int = _option(
        4, "while streams decode, prompt tokens per step are capped at this many per decoding row (at least 32), "
        "so long prompts do not stretch other streams' inter-token latency; 0 = always --prefill-chunk-tokens")
    max_queued_requests: int = _option(256, "requests waiting for a slot before new ones get RESOURCE_EXHAUSTED")
    default_max_new_tokens: int = _option(256, "max_new_tokens when a request leaves it 0")
    max_new_tokens_limit: int = _option(2048, "largest max_new_tokens a request may ask for")
    max_stop_strings: int = _option(8, "most stop strings per request")
    max_stop_string_length: int = _option(128, "longest stop string, in characters")
    max_logprobs: int = _option(20, "largest top-n logprobs a request may ask for")
    max_request_bytes: int = _option(4 * 1024 * 1024, "largest request message; larger ones get RESOURCE_EXHAUSTED")
    intra_op_threads: int = _option(0, "onnxruntime intra-op threads; 0 = one per core")
    intra_op_spinning: str = _option(
        "off", "on: onnxruntime's pool threads spin between operators, taking the cores that the gRPC layer and "
        "other processes need (inter-token latency jitter); off: they sleep", choices=("on", "off"))
    device: str = _option("auto", "cpu, cuda, or auto (cuda when onnxruntime-gpu sees a GPU)", choices=("cpu", "cuda", "auto"))
    drain_grace_seconds: float = _option(30.0, "on SIGTERM, how long accepted requests may take to finish")
    stream_buffer_tokens: int = _option(
        64, "tokens a request may generate ahead of its client; then it pauses, keeping its KV slot, until the client reads")
    stream_stall_timeout_seconds: float = _option(
        30.0, "a request whose client has taken none of its output for this long is cancelled and its KV slot freed")
    tls_cert_file: str = _option("", "PEM certificate (chain) for TLS on every listener; with --tls-key-file, "
                                 "gRPC and metrics speak TLS only")
    tls_key_file: str = _option("", "PEM private key of --tls-cert-file (unencrypted)")
    tls_client_ca_file: str = _option("", "PEM CA: require client certificates signed by it on every TLS listener "
                                      "(mutual TLS)")
    tls_reload_interval_seconds: float = _option(
        10.0, "how often rotated certificate, key and API-key files are picked up (new connections use them)")
    api_keys_file: str = _option("", "API keys, one per line (the key, or sha256:HEX of it); clients send "
                                 "`authorization: Bearer KEY`; re-read when it changes")
    api_keys: str = _option("", "API keys, comma-separated (an environment variable only, never a flag: "
                            "command lines are visible to every user of the machine)", env_only=True)
    health_needs_api_key: str = _option("off", "on: grpc.health also needs an API key", choices=("on", "off"))
    reflection_needs_api_key: str = _option("off", "on: server reflection also needs an API key", choices=("on", "off"))
    metrics_needs_api_key: str = _option("off", "on: /metrics also needs an API key (Prometheus: "
                                         "`authorization: {credentials_file: ...}`)", choices=("on", "off"))
    http_port: int = _option(8000, "OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, "
                             "/v1/models, /health; docs/openai.md); 0 disables it")
    served_model_name: str = _option("", "the model name the HTTP and KServe v2 APIs answer to and report; empty "
                                     "= the model card's name")
    health_port: int = _option(-1, "a plaintext listener serving only grpc.health.v1, for probes that cannot "
                               "speak (mutual) TLS; 0 picks a free one, -1 disables it")
    inspection_max_tokens: int = _option(512, "InspectAttention: most tokens inspected (prompt + generated_tokens)")
    inspection_max_generated_tokens: int = _option(64, "InspectAttention: most greedy tokens appended to the prompt")
    inspection_max_floats: int = _option(16 * 1024 * 1024, "InspectAttention: most probabilities per answer "
                                         "(layers x heads x tokens^2; 4 bytes each)")
    inspection_max_queued: int = _option(2, "InspectAttention: inspections running or waiting before new ones get "
                                         "RESOURCE_EXHAUSTED")
    inspection_intra_op_threads: int = _option(
        1, "onnxruntime threads of the inspection session (its own, on the CPU), kept small so generation keeps its cores")
    batch_window_ms: float = _option(2.0, "encoders and image classifiers: inputs of calls arriving within this "
                                     "many ms of the oldest waiting one run together")
    max_batch: int = _option(32, "encoders and image classifiers: most inputs (texts or images) per model run")
    max_batch_tokens: int = _option(8192, "encoders: most padded tokens per run (inputs x the longest); a longer "
                                    "text still runs, alone")
    max_inputs_per_request: int = _option(128, "most texts (Embed) or images (Classify) per call")
    max_image_bytes: int = _option(4 * 1024 * 1024, "largest encoded (PNG or JPEG) image")
    max_image_pixels: int = _option(4096 * 4096, "most pixels (height x width) per image, read from the header "
                                    "before decoding: a decompression-bomb guard")
    encoder_intra_op_threads: int = _option(
        1, "onnxruntime threads of each encoder's and image classifier's session; one keeps the decoder's steps "
        "from waiting for cores that embeddings hold")
    fault_injection: str = _option(
        "", "for reliability tests only: 'run:N' makes the Nth model run raise, 'run:N+' every run from the Nth on")
    log_level: str = _option("INFO", "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self):
        problems = []
        object.__setattr__(self, "model", model_dirs(self.model))  # frozen: normalized once, here
        if not self.model:
            problems.append("--model is required (or ATTNSERVE_MODEL)")
        repeated = sorted({str(d) for d in self.model if self.model.count(d) > 1})
        if repeated:
            problems.append(f"--model {', '.join(repeated)} is given more than once")
        for name in ("kv_slots", "max_seq_len", "prefill_chunk_tokens", "max_queued_requests",
                     "default_max_new_tokens", "max_new_tokens_limit", "max_request_bytes", "stream_buffer_tokens",
                     "max_batch", "max_batch_tokens", "max_inputs_per_request", "max_image_bytes",
                     "max_image_pixels", "encoder_intra_op_threads"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.prefill_tokens_per_decode_row < 0:
            problems.append(f"--prefill-tokens-per-decode-row must be at least 0, got {self.prefill_tokens_per_decode_row}")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in [0, 65535], got {self.port}")
        if not 0 <= self.http_port <= 65535:
            problems.append(f"--http-port must be in [0, 65535] (0 = off), got {self.http_port}")
        for name in ("metrics_port", "health_port"):
            if not -1 <= getattr(self, name) <= 65535:
                problems.append(f"--{name.replace('_', '-')} must be in [-1, 65535], got {getattr(self, name)}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("--tls-cert-file and --tls-key-file go together: give both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append("--tls-client-ca-file needs --tls-cert-file and --tls-key-file (mutual TLS is TLS)")
        if not self.tls_reload_interval_seconds > 0:
            problems.append(f"--tls-reload-interval-seconds must be > 0, got {self.tls_reload_interval_seconds}")
        if not self.api_keys_file and not self.api_keys.strip(", "):
            for name in ("health_needs_api_key", "reflection_needs_api_key", "metrics_needs_api_key"):
                if getattr(self, name) == "on":
                    problems.append(f"--{name.replace('_', '-')} on needs API keys (--api-keys-file or "
                                    f"{ENV_PREFIX}API_KEYS)")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            problems.append("--default-max-new-tokens must not exceed --max-new-tokens-limit")
        if not self.stream_stall_timeout_seconds > 0:
            problems.append(f"--stream-stall-timeout-seconds must be > 0, got {self.stream_stall_timeout_seconds}")
        for name in ("inspection_max_tokens", "inspection_max_floats", "inspection_max_queued",
                     "inspection_intra_op_threads"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.inspection_max_generated_tokens < 0:
            problems.append(f"--inspection-max-generated-tokens must be at least 0, got "
                            f"{self.inspection_max_generated_tokens}")
        if not 0 <= self.batch_window_ms <= 1000:
            problems.append(f"--batch-window-ms must be in [0, 1000], got {self.batch_window_ms}")
        if self.fault_injection:
            try:
                parse_fault_spec(self.fault_injection)
            except ValueError as e:
                problems.append(f"--fault-injection: {e}")
        if problems:
            raise ValueError("; ".join(problems))


def model_dirs(value) -> tuple[Path, ...]:
    """--model as given: one path, several, or the environment's comma-separated list."""
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        value = str(value).split(",") if isinstance(value, str) else [value]
    return tuple(Path(v) for v in (str(v).strip() for v in value) if v)


def parse_config(argv: Optional[Sequence[str]] = None, environ: Optional[dict] = None) -> ServerConfig:
    """Flags, then ATTNSERVE_* variables, then defaults. Raises ValueError with every problem found."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="python -m server", description="Serve a model dir over gRPC.", allow_abbrev=False)
    for f in dataclasses.fields(ServerConfig):
        env_name = ENV_PREFIX + f.name.upper()
        if f.metadata.get("env_only"):
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None,
            choices=f.metadata.get("choices"), type=_type_of(f),
            action="append" if f.name == "model" else "store",
            help=f"{f.metadata['help']} [env {env_name}; default {f.default}]",
        )
    args = parser.parse_args(argv)
    values = {}
    for f in dataclasses.fields(ServerConfig):
        value = getattr(args, f.name, None)
        if value is None and ENV_PREFIX + f.name.upper() in environ:
            raw = environ[ENV_PREFIX + f.name.upper()]
            try:
                value = _type_of(f)(raw)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX + f.name.upper()}={raw!r} is not a valid {f.name}") from None
        if value is not None:
            values[f.name] = value
    return ServerConfig(**values)


def _type_of(f: dataclasses.Field):
    return {"model": str}.get(f.name) or type(f.default)
