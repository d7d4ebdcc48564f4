"""One onnxruntime session over a model dir, run one ragged step at a time.

The runner knows the serving graph's inputs and the KV buffers; it knows
nothing about requests. A step is a StepInputs of numpy arrays for slots
[0, rows); the result is the logits of each row's last new token.

Where the memory lives, per step, on either device:

    host (numpy)                              device ('cpu' or 'cuda' OrtValues)
    input_ids, position_ids, seqlens_k,  ──►  copied in by onnxruntime (a few hundred bytes)
    query_seqlens, total_sequence_length
                                              KV buffers: bound in place as past and present,
                                              never copied, never leave the device
    logits float32 [rows, V]             ◄──  the only output that comes back
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnxruntime as ort

from server import contract
from server.contract import ModelCard
from server.kv_buffers import CacheShape, KVBuffers

log = logging.getLogger("attnserve.runner")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEVICES = ("cpu", "cuda", "auto")
# ONNX element types of the cache inputs, by the model card's dtype.
ONNX_CACHE_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}
# Model dtypes each device serves. onnxruntime's CUDA GroupQueryAttention has fp16 and
# bf16 kernels only: in an fp32 graph the CUDA EP leaves attention to the CPU EP, which
# copies every layer's KV cache to the host and back on every step.
DEVICE_DTYPES = {"cpu": ("float32", "float16"), "cuda": ("float16",)}


class RunnerError(Exception):
    """The model dir or the device cannot be used; the message says why (one line)."""


@dataclass
class StepInputs:
    input_ids: np.ndarray  # int64 [rows, S], right-padded
    position_ids: np.ndarray  # int64 [rows, S]
    seqlens_k: np.ndarray  # int32 [rows]: tokens in the slot after this step, minus one
    query_seqlens: np.ndarray  # int32 [rows]: new tokens per row, 0 = idle
    first_slot: int = 0  # row r of the call is KV slot first_slot + r

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def onnxruntime_has_query_seqlens() -> bool:
    """Does this onnxruntime's GroupQueryAttention take query_seqlens? (1.32 does; 1.31, the newest
    onnxruntime-gpu on PyPI when this was written, does not: it loads only the dir's second graph.)"""
    from onnxruntime.capi import _pybind_state

    schemas = [s for s in _pybind_state.get_all_operator_schema()
               if s.name == "GroupQueryAttention" and s.domain == "com.microsoft"]
    return bool(schemas) and len(schemas[0].inputs) > contract.QUERY_SEQLENS_INDEX


# The contrib ops of block-quantized model dirs (the card's `weights`): MatMulNBits and GatherBlockQuantized.
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")


def missing_quantized_ops() -> list[str]:
    """QUANTIZED_OPS this onnxruntime lacks (read from its operator schemas, as for query_seqlens)."""
    from onnxruntime.capi import _pybind_state

    have = {s.name for s in _pybind_state.get_all_operator_schema() if s.domain == "com.microsoft"}
    return [op for op in QUANTIZED_OPS if op not in have]


CALL_PLANS = ("auto", "mixed", "uniform")


def choose_call_plan(requested: str, has_query_seqlens: bool) -> str:
    """'mixed' where the GroupQueryAttention takes query_seqlens, else 'uniform'; 'uniform' may be asked for anyway
    (its graph runs on every onnxruntime: verification checks it on the exporting machine)."""
    if requested not in CALL_PLANS:
        raise RunnerError(f"call plan must be one of {', '.join(CALL_PLANS)}, got {requested!r}")
    if requested == "mixed" and not has_query_seqlens:
        raise RunnerError(f"onnxruntime {ort.__version__}'s GroupQueryAttention has no query_seqlens input "
                          "(1.32 added it): it cannot run mixed calls")
    if requested == "auto":
        return "mixed" if has_query_seqlens else "uniform"
    return requested


def serving_graph(card: ModelCard, call_plan: str) -> str:
    """The model dir's graph for a call plan (file name)."""
    name = card.graphs.get("with_query_seqlens" if call_plan == "mixed" else "without_query_seqlens")
    if name is None:
        raise RunnerError(
            f"onnxruntime {ort.__version__}'s GroupQueryAttention has no query_seqlens input (1.32 added it) and "
            f"this model dir holds no graph without it ({contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS}); re-export it "
            "with `python -m export`, which writes both"
        )
    return name


def resolve_device(device: str, available: Optional[Sequence[str]] = None) -> str:
    """'auto' -> 'cuda' when onnxruntime offers CUDA, else 'cpu' (logged); an explicit choice must be offered.

    available: the execution providers to choose from; onnxruntime's own list when None.
    """
    available = list(ort.get_available_providers() if available is None else available)
    if device not in DEVICES:
        raise RunnerError(f"--device must be cpu, cuda or auto, got {device!r}")
    if device == "auto":
        chosen = "cuda" if PROVIDERS["cuda"] in available else "cpu"
        log.info("--device auto: %s (%s %s offered by this onnxruntime)", chosen, PROVIDERS["cuda"],
                 "is" if chosen == "cuda" else "is not")
        return chosen
    if PROVIDERS[device] not in available:
        raise RunnerError(
            f"--device {device} asked for {PROVIDERS[device]}, but this onnxruntime offers only "
            f"{', '.join(available)}; install the onnxruntime-gpu build (make setup picks it where nvidia-smi exists)"
        )
    return device


def load_cuda_libraries() -> None:
    """Load CUDA, cuBLAS and cuDNN before a CUDA session starts.

    onnxruntime-gpu's CUDA EP finds them by name; installed as NVIDIA's wheels (the gpu extra, the GPU
    image) they sit in site-packages, off the dynamic loader's path, and preload_dlls loads them from there.
    Where they are missing the session start says so (and --device auto falls back to the CPU).
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as e:  # noqa: BLE001 - a library it cannot load shows again when the session starts
        log.warning("onnxruntime.preload_dlls: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)


def session_providers(device: str, device_id: int, dtype: str) -> list:
    """The provider list for InferenceSession: CUDA first (the CPU EP takes the few ops CUDA lacks), or CPU alone.

    For fp32 graphs TF32 is switched off: onnxruntime's CUDA EP enables it by default, and
    its 10-bit mantissa would make fp32 on the GPU disagree with fp32 on the CPU.
    """
    if device == "cpu":
        return [PROVIDERS["cpu"]]
    cuda_options = {"device_id": str(device_id), "use_tf32": "1" if dtype != "float32" else "0"}
    return [(PROVIDERS["cuda"], cuda_options), PROVIDERS["cpu"]]


def device_for_dtype(device: str, dtype: str, requested: str) -> str:
    """The resolved device, unless it cannot serve dtype: then refuse (--device cuda) or fall back to cpu (auto)."""
    if dtype in DEVICE_DTYPES[device] or dtype not in ONNX_CACHE_TYPES:  # an unknown dtype: _check_graph says so
        return device
    if requested != "auto":
        raise RunnerError(
            f"--device {device} cannot serve this {dtype} model dir: onnxruntime's CUDA GroupQueryAttention has "
            "fp16 and bf16 kernels only, so attention would run on the CPU and copy the KV cache across PCIe "
            "every step; export the model with `python -m export --dtype fp16`"
        )
    log.warning("--device auto: using cpu after all: the model dir is %s, which %s does not serve (export it "
                "with --dtype fp16 to serve it on the GPU)", dtype, device)
    return "cpu"


def session_options(intra_op_threads: int = 0, intra_op_spinning: bool = False) -> ort.SessionOptions:
    """The onnxruntime session options the server runs with (bench.profile adds profiling to the same)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    # Spinning pool threads keep a core busy between operators. The engine shares the cores with the
    # event loop, gRPC and other pods, and a spinning thread delays them by a scheduler time slice:
    # on 2 cores that was a 5 ms inter-token p99 at a 0.9 ms p50 (docs/benchmarks.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if intra_op_spinning else "0")
    return options


class ModelRunner:
    """allow_fp32_cuda: run an fp32 graph on CUDA anyway (attention on the CPU EP, the cache copied
    every step). For verification only (bench/gpu_verify.py); the server never sets it.

    call_plan: 'mixed' (any rows in one call; query_seqlens says each row's new tokens) or 'uniform' (every row
    of a call brings the call's width of new tokens: server/scheduler.py uniform_calls); 'auto' picks by the
    runtime's GroupQueryAttention."""

    def __init__(self, model_dir: Path, card: ModelCard, kv_slots: int, capacity: int,
                 device: str = "cpu", intra_op_threads: int = 0, device_id: int = 0, allow_fp32_cuda: bool = False,
                 intra_op_spinning: bool = False, call_plan: str = "auto"):
        self.card = card
        self.device_id = device_id
        # Which GroupQueryAttention this onnxruntime has, read from its operator schema: it decides the
        # graph and the call plan (mixed calls with query_seqlens, uniform calls without).
        self.call_plan = choose_call_plan(call_plan, onnxruntime_has_query_seqlens())
        self.graph_file = serving_graph(card, self.call_plan)
        if card.weights and missing_quantized_ops():
            raise RunnerError(f"the model dir's weights are {card.weights.get('scheme')} blocks, but onnxruntime "
                              f"{ort.__version__} has no {', '.join(missing_quantized_ops())}; install onnxruntime "
                              ">= 1.20 or serve an fp32 export")
        self.device = resolve_device(device)
        if not allow_fp32_cuda:
            self.device = device_for_dtype(self.device, card.dtype, device)
        self.session = self._start_session(Path(model_dir), intra_op_threads, intra_op_spinning,
                                           fallback_to_cpu=device == "auto")
        self._check_graph()
        log.info("call plan: %s (%s, onnxruntime %s)", self.call_plan, self.graph_file, ort.__version__)
        self.cache = KVBuffers(
            CacheShape(card.n_layers, kv_slots, card.n_kv_heads, capacity, card.head_dim, card.dtype),
            device_type=self.device, device_id=device_id,
        )
        self.binding = self.session.io_binding()

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]


    def _start_session(self, model_dir: Path, intra_op_threads: int, intra_op_spinning: bool,
                       fallback_to_cpu: bool) -> ort.InferenceSession:
        options = session_options(intra_op_threads, intra_op_spinning)
        path = str(model_dir / self.graph_file)
        providers = session_providers(self.device, self.device_id, self.card.dtype)
        if self.device == "cuda":
            load_cuda_libraries()
        try:
            session = ort.InferenceSession(path, options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt graphs
            raise RunnerError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        # onnxruntime-gpu lists CUDA even where its libraries or the GPU are missing, and then quietly
        # starts a CPU session (logging why): refuse that for --device cuda, take it for auto.
        started = session.get_providers()[0]
        if started != PROVIDERS[self.device]:
            if not fallback_to_cpu:
                raise RunnerError(
                    f"--device {self.device}: onnxruntime could not start {PROVIDERS[self.device]} (it started "
                    f"{started}); check the GPU driver and the CUDA and cuDNN libraries onnxruntime-gpu needs"
                )
            log.warning("--device auto: %s did not start (no usable GPU or CUDA libraries); using cpu",
                        PROVIDERS[self.device])
            self.device = "cpu"
        return session

    def _check_graph(self) -> None:
        """The graph's names and cache dtype must be the model card's (a dir assembled from two exports is not)."""
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        graph_outputs = {o.name: o for o in self.session.get_outputs()}
        expected_in, expected_out = contract.input_names(self.card.n_layers), contract.output_names(self.card.n_layers)
        if sorted(graph_inputs) != sorted(expected_in) or sorted(graph_outputs) != sorted(expected_out):
            raise RunnerError(
                f"model.onnx does not match its model card ({self.card.n_layers} layers): graph inputs "
                f"{list(graph_inputs)[:6]}..., expected {expected_in[:6]}...; re-export the model dir"
            )
        cache_type = graph_inputs[contract.past_key(0)].type
        if self.card.dtype not in ONNX_CACHE_TYPES or cache_type != ONNX_CACHE_TYPES[self.card.dtype]:
            raise RunnerError(f"model.onnx has a {cache_type} KV cache but its model card says dtype "
                              f"{self.card.dtype!r}; re-export the model dir")
        if graph_outputs[contract.LOGITS].type != "tensor(float)":
            raise RunnerError(f"model.onnx returns {graph_outputs[contract.LOGITS].type} logits, not float32; "
                              "re-export the model dir")

    def step(self, inputs: StepInputs) -> np.ndarray:
        """Run one call over slots [first_slot, first_slot + rows); returns float32 logits [rows, V]."""
        bind_step(self.binding, inputs, self.cache)
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()


def bind_step(binding, inputs: StepInputs, cache: KVBuffers) -> None:
    """Bind one call's inputs and outputs; binding is an onnxruntime IOBinding (or a stand-in in tests).

    The small integer inputs are bound as host arrays on every device. On CUDA,
    onnxruntime copies input_ids, position_ids, seqlens_k and query_seqlens to the
    GPU (B*S*8 bytes or less: a few microseconds of the step) and keeps
    total_sequence_length on the host, where GroupQueryAttention's CUDA kernel
    reads it; binding that one on the device would cost a device-to-host copy
    and a stream synchronization. Device-side staging buffers for the others
    would save nothing: filling them is the same copy.
    """
    binding.clear_binding_inputs()
    binding.clear_binding_outputs()
    binding.bind_cpu_input(contract.INPUT_IDS, inputs.input_ids)
    binding.bind_cpu_input(contract.POSITION_IDS, inputs.position_ids)
    binding.bind_cpu_input(contract.SEQLENS_K, inputs.seqlens_k)
    binding.bind_cpu_input(contract.QUERY_SEQLENS, inputs.query_seqlens)
    binding.bind_cpu_input(contract.TOTAL_SEQUENCE_LENGTH, np.array(cache.shape.capacity, dtype=np.int32))
    # Host memory, whatever the device: the logits are what sampling reads. First, so get_outputs()[0].
    binding.bind_output(contract.LOGITS, "cpu")
    cache.bind(binding, inputs.first_slot, inputs.rows)
