"""--device cpu|cuda|auto: provider selection, the one-line refusal, and what the server reports.

The CUDA branches are driven by injecting the provider list (resolve_device(device, available=...)), so
they run on every machine. The tests of what the real onnxruntime does assume the CPU build (what `make
setup` installs where there is no nvidia-smi) and are skipped, saying so, on a machine with onnxruntime-gpu.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from attnserve.v1 import generation_pb2 as pb
from server.runner import ModelRunner, RunnerError, device_for_dtype, resolve_device, session_providers

ROOT = Path(__file__).resolve().parents[2]
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# onnxruntime-gpu offers CUDA (the server then resolves --device auto to cuda); the CPU build does not.
CUDA_BUILD = CUDA in ort.get_available_providers()
cpu_build_only = pytest.mark.skipif(
    CUDA_BUILD, reason=f"this onnxruntime offers {CUDA} (onnxruntime-gpu), and the test checks the CPU "
                       "build's behaviour (--device auto serves on cpu, --device cuda is refused)")


class CapturedLog(logging.Handler):
    """Collects records of the runner's logger (the suite may run with pytest's logging plugin off)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger = logging.getLogger("attnserve.runner")
        self.level = self.logger.level
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


@cpu_build_only
def test_the_real_onnxruntime_here_resolves_to_cpu():
    assert resolve_device("cpu") == "cpu"
    with CapturedLog() as captured:
        assert resolve_device("auto") == "cpu"
    assert captured.messages == [f"--device auto: cpu ({CUDA} is not offered by this onnxruntime)"]


@pytest.mark.skipif(not CUDA_BUILD, reason=f"this onnxruntime is the CPU build: it offers no {CUDA}")
def test_the_real_onnxruntime_gpu_build_resolves_auto_to_cuda():
    with CapturedLog() as captured:
        assert resolve_device("auto") == "cuda"
    assert captured.messages == [f"--device auto: cuda ({CUDA} is offered by this onnxruntime)"]
    assert resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"


@cpu_build_only
def test_cuda_without_cuda_is_refused_naming_the_provider_and_the_fix():
    with pytest.raises(RunnerError) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert "\n" not in message
    assert CUDA in message and "onnxruntime-gpu" in message and CPU in message


@pytest.mark.parametrize("available, device, expected", [
    ([CUDA, CPU], "auto", "cuda"),
    ([CUDA, CPU], "cuda", "cuda"),
    ([CUDA, CPU], "cpu", "cpu"),
    ([CPU], "auto", "cpu"),
    (["TensorrtExecutionProvider", CUDA, CPU], "auto", "cuda"),
])
def test_injected_provider_lists(available, device, expected):
    with CapturedLog() as captured:
        assert resolve_device(device, available=available) == expected
    if device == "auto":
        assert captured.messages == [f"--device auto: {expected} ({CUDA} {'is' if expected == 'cuda' else 'is not'} "
                                     "offered by this onnxruntime)"]


@pytest.mark.parametrize("available, device", [([CPU], "cuda"), ([], "cpu"), ([CUDA, CPU], "rocm")])
def test_injected_refusals(available, device):
    with pytest.raises(RunnerError):
        resolve_device(device, available=available)


def test_cuda_serves_fp16_model_dirs_only():
    """onnxruntime's CUDA GroupQueryAttention has no fp32 kernel: an fp32 graph would copy the cache every step."""
    assert device_for_dtype("cuda", "float16", requested="cuda") == "cuda"
    assert device_for_dtype("cpu", "float32", requested="cpu") == "cpu"
    assert device_for_dtype("cpu", "float16", requested="auto") == "cpu"
    with pytest.raises(RunnerError, match="--dtype fp16") as error:
        device_for_dtype("cuda", "float32", requested="cuda")
    assert "\n" not in str(error.value)
    with CapturedLog() as captured:
        assert device_for_dtype("cuda", "float32", requested="auto") == "cpu"
    assert len(captured.messages) == 1 and "using cpu after all" in captured.messages[0]


def test_session_providers_per_device_and_dtype():
    assert session_providers("cpu", 0, "float32") == [CPU]
    # fp32 on the GPU means fp32: onnxruntime's default TF32 matmuls would break greedy parity with the CPU.
    assert session_providers("cuda", 1, "float32") == [(CUDA, {"device_id": "1", "use_tf32": "0"}), CPU]
    assert session_providers("cuda", 0, "float16") == [(CUDA, {"device_id": "0", "use_tf32": "1"}), CPU]


@cpu_build_only
def test_runner_refuses_cuda_here_and_runs_on_cpu_for_auto(test_model_dir):
    from server.contract import ModelCard

    card = ModelCard.load(test_model_dir)
    with pytest.raises(RunnerError, match=CUDA):
        ModelRunner(test_model_dir, card, kv_slots=1, capacity=8, device="cuda")
    runner = ModelRunner(test_model_dir, card, kv_slots=1, capacity=8, device="auto")
    assert runner.device == "cpu" and runner.provider == CPU and runner.cache.device_type == "cpu"


def test_a_model_dir_whose_graph_disagrees_with_its_card_dtype_is_refused(test_fp16_model_dir):
    import dataclasses

    from server.contract import ModelCard

    card = dataclasses.replace(ModelCard.load(test_fp16_model_dir), dtype="float32")
    with pytest.raises(RunnerError, match="float16.*re-export"):
        ModelRunner(test_fp16_model_dir, card, kv_slots=1, capacity=8, device="cpu")


@cpu_build_only
def test_server_with_device_cuda_exits_non_zero_with_one_line(test_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model", str(test_model_dir), "--device", "cuda",
         "--port", "0", "--metrics-port", "-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert "--device cuda" in errors[0] and CUDA in errors[0] and "onnxruntime-gpu" in errors[0]


@cpu_build_only
@pytest.mark.parametrize("which", ["float32", "float16"])
def test_server_reports_provider_and_dtype(which, server_process, test_model_dir, test_fp16_model_dir):
    server = server_process(test_model_dir if which == "float32" else test_fp16_model_dir,
                            "--device", "auto", "--kv-slots", "2", "--max-seq-len", "128")
    info = server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert (info.execution_provider, info.dtype) == (CPU, which)
    assert any(f"--device auto: cpu ({CUDA} is not offered" in line for line in server.log), "".join(server.log)
    assert server.metric("attnserve_model_info", f'dtype="{which}"') == 1
    assert server.metric("attnserve_model_info", f'execution_provider="{CPU}"') == 1
    response = server.stub().Generate(pb.GenerateRequest(prompt="def f(x):", max_new_tokens=8, ignore_eos=True), timeout=60)
    assert len(response.token_ids) == 8
