"""The KV cache as onnxruntime memory: one preallocated keys and one values buffer per layer.

Each buffer is (slots, Hkv, M, hd) and lives in onnxruntime's memory on the
session's device. A call binds slots of every buffer as both
`past_key_values.{i}.*` input and `present.{i}.*` output, by pointer, so
GroupQueryAttention writes new keys and values in place: the cache is never
copied, never leaves the device and never becomes a numpy array. A call binds
a contiguous range of slots: usually the prefix up to the highest busy slot
(the slot manager hands out low numbers first, so busy slots stay near the
front), or a single slot for a prefill chunk run on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from export import contract

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class CacheShape:
    n_layers: int
    slots: int
    kv_heads: int
    capacity: int  # tokens per slot (M)
    head_dim: int
    dtype: str

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.kv_heads * self.head_dim * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.slots * self.capacity


class KVBuffers:
    def __init__(self, shape: CacheShape, device_type: str = "cpu", device_id: int = 0):
        self.shape = shape
        self.device_type, self.device_id = device_type, device_id
        self.np_dtype = NUMPY_DTYPES[shape.dtype]
        full = [shape.slots, shape.kv_heads, shape.capacity, shape.head_dim]
        self.keys = [ort.OrtValue.ortvalue_from_shape_and_type(full, self.np_dtype, device_type, device_id)
                     for _ in range(shape.n_layers)]
        self.values = [ort.OrtValue.ortvalue_from_shape_and_type(full, self.np_dtype, device_type, device_id)
                       for _ in range(shape.n_layers)]
        self.slot_bytes = shape.kv_heads * shape.capacity * shape.head_dim * np.dtype(self.np_dtype).itemsize

    def bind(self, binding: ort.IOBinding, first_slot: int, rows: int) -> None:
        """Bind slots [first_slot, first_slot + rows) of every layer as past input and present output (the same memory)."""
        if first_slot < 0 or rows < 1 or first_slot + rows > self.shape.slots:
            raise ValueError(f"slots [{first_slot}, {first_slot + rows}) are outside the cache's {self.shape.slots}")
        shape = [rows, self.shape.kv_heads, self.shape.capacity, self.shape.head_dim]
        for layer in range(self.shape.n_layers):
            for value, past, present in (
                (self.keys[layer], contract.past_key(layer), contract.present_key(layer)),
                (self.values[layer], contract.past_value(layer), contract.present_value(layer)),
            ):
                ptr = value.data_ptr() + first_slot * self.slot_bytes
                binding.bind_input(past, self.device_type, self.device_id, self.np_dtype, shape, ptr)
                binding.bind_output(present, self.device_type, self.device_id, self.np_dtype, shape, ptr)
