"""The KV cache as onnxruntime memory: one preallocated keys and one values buffer per layer.

Each buffer is (slots, Hkv, M, hd) in the model's dtype (float32 or float16)
and lives in onnxruntime's memory on the session's device ('cpu', or 'cuda'
with its device id). A call binds slots of every buffer as both
`past_key_values.{i}.*` input and `present.{i}.*` output, by pointer, so
GroupQueryAttention writes new keys and values in place: the cache is never
copied, never leaves the device and never becomes a numpy array. A call binds
a contiguous range of slots: usually the prefix up to the highest busy slot
(the slot manager hands out low numbers first, so busy slots stay near the
front), or a single slot for a prefill chunk run on its own.

    buffer of layer i:  | slot 0 | slot 1 | slot 2 | slot 3 | ...      (slot_bytes each, contiguous)
    bind(first_slot=1, rows=2):  ptr = base + 1 * slot_bytes, shape [2, Hkv, M, hd]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort

from server import contract

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
DEVICE_TYPES = ("cpu", "cuda")

# allocate(shape, numpy dtype, device_type, device_id) -> an OrtValue exposing data_ptr().
Allocator = Callable[[list, type, str, int], ort.OrtValue]


def allocate_ortvalue(shape: list, dtype: type, device_type: str, device_id: int) -> ort.OrtValue:
    """Uninitialized device memory: GroupQueryAttention reads only the positions a call has written."""
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device_type, device_id)


@dataclass(frozen=True)
class CacheShape:
    n_layers: int
    slots: int
    kv_heads: int
    capacity: int  # tokens per slot (M)
    head_dim: int
    dtype: str

    @property
    def itemsize(self) -> int:
        return np.dtype(NUMPY_DTYPES[self.dtype]).itemsize

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot in one buffer (keys or values of one layer)."""
        return self.kv_heads * self.capacity * self.head_dim * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.kv_heads * self.head_dim * self.itemsize

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.slots * self.capacity


class KVBuffers:
    def __init__(self, shape: CacheShape, device_type: str = "cpu", device_id: int = 0,
                 allocate: Allocator = allocate_ortvalue):
        if shape.dtype not in NUMPY_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {', '.join(NUMPY_DTYPES)}, got {shape.dtype!r}")
        if device_type not in DEVICE_TYPES:
            raise ValueError(f"KV cache device must be one of {', '.join(DEVICE_TYPES)}, got {device_type!r}")
        self.shape = shape
        self.device_type, self.device_id = device_type, device_id
        self.np_dtype = NUMPY_DTYPES[shape.dtype]
        self.slot_bytes = shape.slot_bytes
        full = [shape.slots, shape.kv_heads, shape.capacity, shape.head_dim]
        self.keys = [allocate(full, self.np_dtype, device_type, device_id) for _ in range(shape.n_layers)]
        self.values = [allocate(full, self.np_dtype, device_type, device_id) for _ in range(shape.n_layers)]

    def buffers(self):
        """(layer, OrtValue, past input name, present output name) for every keys and values buffer."""
        for layer in range(self.shape.n_layers):
            yield layer, self.keys[layer], contract.past_key(layer), contract.present_key(layer)
            yield layer, self.values[layer], contract.past_value(layer), contract.present_value(layer)

    def bind(self, binding: ort.IOBinding, first_slot: int, rows: int) -> None:
        """Bind slots [first_slot, first_slot + rows) of every layer as past input and present output (the same memory)."""
        if first_slot < 0 or rows < 1 or first_slot + rows > self.shape.slots:
            raise ValueError(f"slots [{first_slot}, {first_slot + rows}) are outside the cache's {self.shape.slots}")
        shape = [rows, self.shape.kv_heads, self.shape.capacity, self.shape.head_dim]
        for _layer, value, past, present in self.buffers():
            ptr = value.data_ptr() + first_slot * self.slot_bytes
            binding.bind_input(past, self.device_type, self.device_id, self.np_dtype, shape, ptr)
            binding.bind_output(present, self.device_type, self.device_id, self.np_dtype, shape, ptr)
