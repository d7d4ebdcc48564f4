"""One onnxruntime session over a model dir, run one ragged step at a time.

The runner knows the serving graph's inputs and the KV buffers; it knows
nothing about requests. A step is a StepInputs of numpy arrays for slots
[0, rows); the result is the logits of each row's last new token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export import contract
from export.contract import ModelCard
from server.kv_buffers import CacheShape, KVBuffers

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class RunnerError(Exception):
    """The model dir or the device cannot be used; the message says why."""


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


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when onnxruntime offers CUDA, else 'cpu'; an explicit choice must be available."""
    available = ort.get_available_providers()
    if device == "auto":
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if device not in PROVIDERS:
        raise RunnerError(f"--device must be cpu, cuda or auto, got {device!r}")
    if PROVIDERS[device] not in available:
        raise RunnerError(
            f"--device {device} asked for {PROVIDERS[device]}, but this onnxruntime offers only {available}; "
            "install the onnxruntime-gpu build (make setup picks it where nvidia-smi exists)"
        )
    return device


class ModelRunner:
    def __init__(self, model_dir: Path, card: ModelCard, kv_slots: int, capacity: int,
                 device: str = "cpu", intra_op_threads: int = 0):
        self.card = card
        self.device = resolve_device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads
        providers = [PROVIDERS[self.device]] + (["CPUExecutionProvider"] if self.device == "cuda" else [])
        try:
            self.session = ort.InferenceSession(str(Path(model_dir) / contract.MODEL_FILE), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt graphs
            raise RunnerError(f"onnxruntime cannot load {model_dir}/{contract.MODEL_FILE}: {str(e).splitlines()[0]}") from None
        if self.session.get_providers()[0] != PROVIDERS[self.device]:
            raise RunnerError(f"onnxruntime did not start {PROVIDERS[self.device]} (got {self.session.get_providers()})")
        self._check_graph_names()
        self.cache = KVBuffers(
            CacheShape(card.n_layers, kv_slots, card.n_kv_heads, capacity, card.head_dim, card.dtype),
            device_type=self.device,
        )
        self.binding = self.session.io_binding()

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def _check_graph_names(self) -> None:
        graph_inputs = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        expected_in, expected_out = contract.input_names(self.card.n_layers), contract.output_names(self.card.n_layers)
        if sorted(graph_inputs) != sorted(expected_in) or sorted(graph_outputs) != sorted(expected_out):
            raise RunnerError(
                f"model.onnx does not match its model card ({self.card.n_layers} layers): graph inputs "
                f"{graph_inputs[:6]}..., expected {expected_in[:6]}...; re-export the model dir"
            )

    def step(self, inputs: StepInputs) -> np.ndarray:
        """Run one call over slots [first_slot, first_slot + rows); returns float32 logits [rows, V]."""
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input(contract.INPUT_IDS, inputs.input_ids)
        binding.bind_cpu_input(contract.POSITION_IDS, inputs.position_ids)
        binding.bind_cpu_input(contract.SEQLENS_K, inputs.seqlens_k)
        binding.bind_cpu_input(contract.QUERY_SEQLENS, inputs.query_seqlens)
        binding.bind_cpu_input(contract.TOTAL_SEQUENCE_LENGTH, np.array(self.cache.shape.capacity, dtype=np.int32))
        binding.bind_output(contract.LOGITS, "cpu")  # first, so it is get_outputs()[0]
        self.cache.bind(binding, inputs.first_slot, inputs.rows)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()
