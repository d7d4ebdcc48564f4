"""Startup faults: each exits non-zero within seconds with one clear `error:` line and no traceback."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server.helpers import ROOT

EXIT_WITHIN_SECONDS = 30  # importing onnxruntime and loading the test model takes a few seconds here


def _start(model_dir: Path, *flags: str) -> tuple[int, str, float]:
    command = [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--http-port", "0", "--kv-slots", "2", "--max-seq-len", "256", *flags]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=EXIT_WITHIN_SECONDS + 30)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def _copy(test_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(test_model_dir, copy)
    return copy


def _edit_card(model_dir: Path, **fields) -> None:
    card = model_dir / "attnserve.json"
    card.write_text(json.dumps(json.loads(card.read_text()) | fields))


def _listening_socket() -> socket.socket:
    """A port held the way another program would hold it: bound and listening, without SO_REUSEPORT."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


# (case, how to break things: (model dir, tmp path, held socket port) -> (model dir, extra flags), words in the line)
CASES = {
    "missing model dir": (lambda d, tmp, port: (tmp / "nowhere", []), ["does not exist"]),
    "model dir without model.onnx": (lambda d, tmp, port: (_without(d, "model.onnx"), []), ["has no model.onnx"]),
    "corrupt model.onnx": (lambda d, tmp, port: (_overwrite(d, "model.onnx", b"\x08\x07 not a graph"), []),
                           ["cannot load", "model.onnx"]),
    "unreadable model card": (lambda d, tmp, port: (_overwrite(d, "attnserve.json", b"{not json"), []),
                              ["attnserve.json", "unreadable"]),
    "corrupt tokenizer.json": (lambda d, tmp, port: (_overwrite(d, "tokenizer.json", b"{}"), []), ["tokenizer"]),
    "card with more layers than the graph": (lambda d, tmp, port: (_card(d, n_layers=3), []),
                                             ["does not match its model card"]),
    "card with other KV heads than the graph": (lambda d, tmp, port: (_card(d, n_kv_heads=2), []),
                                                ["does not run with the KV cache its model card describes", "2 KV heads"]),
    "card with another head size than the graph": (lambda d, tmp, port: (_card(d, head_dim=8), []),
                                                   ["model card", "head dim 8"]),
    "card with another vocabulary than the graph": (lambda d, tmp, port: (_card(d, vocab_size=1000), []),
                                                    ["logits", "vocab_size 1000"]),
    "gRPC port in use": (lambda d, tmp, port: (d, ["--port", str(port)]), ["cannot listen", "in use"]),
    "metrics port in use": (lambda d, tmp, port: (d, ["--metrics-port", str(port)]), ["cannot serve metrics", "in use"]),
    "more KV slots than memory": (lambda d, tmp, port: (d, ["--kv-slots", "5000000", "--max-seq-len", "1024"]),
                                  ["--kv-slots 5000000", "GiB", "available"]),
    "bad flag value": (lambda d, tmp, port: (d, ["--fault-injection", "sometimes"]), ["--fault-injection", "run:N"]),
}


def _without(model_dir: Path, name: str) -> Path:
    (model_dir / name).unlink()
    return model_dir


def _overwrite(model_dir: Path, name: str, data: bytes) -> Path:
    (model_dir / name).write_bytes(data)
    return model_dir


def _card(model_dir: Path, **fields) -> Path:
    _edit_card(model_dir, **fields)
    return model_dir


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_startup_fault_exits_with_one_clear_line(case, test_model_dir, tmp_path):
    breaks, words = CASES[case]
    held = _listening_socket()
    try:
        model_dir, flags = breaks(_copy(test_model_dir, tmp_path), tmp_path, held.getsockname()[1])
        code, output, seconds = _start(model_dir, *flags)
    finally:
        held.close()
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code != 0, output
    assert seconds < EXIT_WITHIN_SECONDS
    assert "Traceback" not in output, output
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0], errors[0]


def test_a_second_server_on_the_same_port_fails_rather_than_sharing_it(test_model_dir, server_process):
    first = server_process(test_model_dir, "--kv-slots", "2", "--max-seq-len", "256")
    code, output, _ = _start(test_model_dir, "--port", str(first.port))
    assert code != 0 and "cannot listen" in output, output
    assert first.process.poll() is None
