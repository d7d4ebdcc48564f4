"""KV buffers: where they are allocated, what a call binds, and which memory a slot range writes.

The CUDA path is checked without a GPU by injecting the allocator and a
recording stand-in for onnxruntime's IOBinding; the pointer arithmetic is
checked for real on the CPU, in fp32 and fp16, by reading the buffers' memory
after a call on a slot range.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from server import contract
from server.contract import ModelCard
from server.kv_buffers import CacheShape, KVBuffers
from server.runner import ModelRunner, StepInputs, bind_step


class FakeOrtValue:
    def __init__(self, address: int):
        self.address = address

    def data_ptr(self) -> int:
        return self.address


class RecordingAllocator:
    """Stands in for OrtValue.ortvalue_from_shape_and_type; hands out fake, far-apart addresses."""

    def __init__(self):
        self.calls = []

    def __call__(self, shape, dtype, device_type, device_id):
        self.calls.append((list(shape), dtype, device_type, device_id))
        return FakeOrtValue(0x7F0000000000 + len(self.calls) * 0x100000000)


class RecordingBinding:
    """Stands in for onnxruntime.IOBinding; records what is bound where."""

    def __init__(self):
        self.inputs, self.outputs, self.cpu_inputs, self.output_devices = {}, {}, {}, {}

    def clear_binding_inputs(self):
        self.inputs.clear()
        self.cpu_inputs.clear()

    def clear_binding_outputs(self):
        self.outputs.clear()
        self.output_devices.clear()

    def bind_cpu_input(self, name, array):
        self.cpu_inputs[name] = array

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.inputs[name] = (device_type, device_id, element_type, list(shape), buffer_ptr)

    def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
        if buffer_ptr is None:
            self.output_devices[name] = device_type
        else:
            self.outputs[name] = (device_type, device_id, element_type, list(shape), buffer_ptr)


SHAPE = CacheShape(n_layers=3, slots=8, kv_heads=2, capacity=128, head_dim=16, dtype="float16")


def test_cuda_buffers_are_allocated_on_the_device_in_the_cache_dtype():
    allocate = RecordingAllocator()
    KVBuffers(SHAPE, device_type="cuda", device_id=1, allocate=allocate)
    assert len(allocate.calls) == 2 * SHAPE.n_layers  # one keys and one values buffer per layer
    for shape, dtype, device_type, device_id in allocate.calls:
        assert shape == [8, 2, 128, 16] and dtype is np.float16 and (device_type, device_id) == ("cuda", 1)
    assert SHAPE.slot_bytes == 2 * 128 * 16 * 2 and SHAPE.bytes_per_token == 2 * 3 * 2 * 16 * 2


def test_a_slot_range_binds_past_and_present_to_the_same_device_memory():
    allocate = RecordingAllocator()
    cache = KVBuffers(SHAPE, device_type="cuda", device_id=1, allocate=allocate)
    binding = RecordingBinding()
    cache.bind(binding, first_slot=2, rows=3)
    for layer in range(SHAPE.n_layers):
        for value, past, present in ((cache.keys[layer], contract.past_key(layer), contract.present_key(layer)),
                                     (cache.values[layer], contract.past_value(layer), contract.present_value(layer))):
            expected = ("cuda", 1, np.float16, [3, 2, 128, 16], value.data_ptr() + 2 * SHAPE.slot_bytes)
            assert binding.inputs[past] == expected
            assert binding.outputs[present] == expected
    assert len(binding.inputs) == len(binding.outputs) == 2 * SHAPE.n_layers


@pytest.mark.parametrize("first_slot, rows", [(-1, 1), (0, 0), (6, 3), (8, 1)])
def test_slot_ranges_outside_the_cache_are_refused(first_slot, rows):
    cache = KVBuffers(SHAPE, device_type="cuda", allocate=RecordingAllocator())
    with pytest.raises(ValueError, match="outside the cache"):
        cache.bind(RecordingBinding(), first_slot, rows)


def test_unknown_dtype_or_device_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        KVBuffers(CacheShape(1, 1, 1, 8, 4, "bfloat16"), allocate=RecordingAllocator())
    with pytest.raises(ValueError, match="device"):
        KVBuffers(SHAPE, device_type="rocm", allocate=RecordingAllocator())


def test_a_cuda_step_sends_small_inputs_from_the_host_and_brings_back_only_logits():
    cache = KVBuffers(SHAPE, device_type="cuda", allocate=RecordingAllocator())
    binding = RecordingBinding()
    inputs = StepInputs(np.zeros((2, 5), np.int64), np.zeros((2, 5), np.int64),
                        np.array([4, 4], np.int32), np.array([5, 5], np.int32), first_slot=1)
    bind_step(binding, inputs, cache)
    assert set(binding.cpu_inputs) == {contract.INPUT_IDS, contract.POSITION_IDS, contract.SEQLENS_K,
                                       contract.QUERY_SEQLENS, contract.TOTAL_SEQUENCE_LENGTH}
    assert int(binding.cpu_inputs[contract.TOTAL_SEQUENCE_LENGTH]) == SHAPE.capacity
    assert binding.output_devices == {contract.LOGITS: "cpu"}  # the only output that comes back to the host
    assert {device for device, *_ in binding.inputs.values()} == {"cuda"}  # the cache stays on the device
    assert {device for device, *_ in binding.outputs.values()} == {"cuda"}


# ---- the real thing on the CPU: a slot range writes exactly its own memory ------------------------


def host_view(cache: KVBuffers, value) -> np.ndarray:
    """A numpy view (not a copy) of a CPU OrtValue's memory, shaped (slots, Hkv, M, hd)."""
    s = cache.shape
    count = s.slots * s.kv_heads * s.capacity * s.head_dim
    raw = (ctypes.c_byte * (count * s.itemsize)).from_address(value.data_ptr())
    return np.frombuffer(raw, dtype=cache.np_dtype).reshape(s.slots, s.kv_heads, s.capacity, s.head_dim)


def prefill_inputs(lengths: list[int], vocab: int, first_slot: int, seed: int = 0) -> StepInputs:
    rng = np.random.default_rng(seed)
    width = max(lengths)
    input_ids = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = rng.integers(0, vocab, n)
    position_ids = np.tile(np.arange(width, dtype=np.int64), (len(lengths), 1))
    return StepInputs(input_ids, position_ids, np.array([n - 1 for n in lengths], np.int32),
                      np.array(lengths, np.int32), first_slot=first_slot)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_slot_range_writes_its_own_slots_and_nothing_else(dtype, test_model_dir, test_fp16_model_dir):
    model_dir = test_model_dir if dtype == "float32" else test_fp16_model_dir
    card = ModelCard.load(model_dir)
    assert card.dtype == dtype
    lengths = [7, 3]
    runner = ModelRunner(model_dir, card, kv_slots=5, capacity=16, device="cpu")
    assert runner.cache.device_type == "cpu" and runner.cache.np_dtype == np.dtype(dtype)
    sentinel = np.asarray(-7.0, dtype=runner.cache.np_dtype)
    for _layer, value, _past, _present in runner.cache.buffers():
        host_view(runner.cache, value)[:] = sentinel
    logits = runner.step(prefill_inputs(lengths, card.vocab_size, first_slot=2))
    assert logits.dtype == np.float32 and logits.shape == (2, card.vocab_size)

    # The same call alone in a two-slot cache: what slots 2 and 3 must now hold.
    alone = ModelRunner(model_dir, card, kv_slots=2, capacity=16, device="cpu")
    alone_logits = alone.step(prefill_inputs(lengths, card.vocab_size, first_slot=0))
    np.testing.assert_array_equal(logits, alone_logits)

    for (_l, value, name, _p), (_l2, alone_value, _n, _p2) in zip(runner.cache.buffers(), alone.cache.buffers()):
        memory, expected = host_view(runner.cache, value), host_view(alone.cache, alone_value)
        for slot in (0, 1, 4):
            assert (memory[slot] == sentinel).all(), f"{name}: slot {slot} outside the range was written"
        for row, n in enumerate(lengths):
            slot = 2 + row
            np.testing.assert_array_equal(memory[slot, :, :n], expected[row, :, :n], err_msg=f"{name} slot {slot}")
            assert (memory[slot, :, :n] != sentinel).any(), f"{name}: slot {slot} was not written"
            assert (memory[slot, :, n:] == sentinel).all(), f"{name}: slot {slot} written past its {n} tokens"
