"""Turns one Call into the serving graph's input arrays (pure NumPy)."""
from __future__ import annotations

import numpy as np

from server.runner import StepInputs
from server.scheduler import Call


def build_step_inputs(call: Call) -> StepInputs:
    shape = (call.rows, call.width)
    input_ids = np.zeros(shape, np.int64)
    position_ids = np.zeros(shape, np.int64)
    seqlens_k = np.zeros(call.rows, np.int32)  # idle rows: 0, since onnxruntime rejects -1 and writes nothing
    query_seqlens = np.zeros(call.rows, np.int32)
    for chunk in call.chunks:
        row = chunk.slot - call.first_slot
        end = chunk.start + chunk.length
        input_ids[row, : chunk.length] = chunk.seq.token_ids[chunk.start : end]
        position_ids[row, : chunk.length] = np.arange(chunk.start, end)
        seqlens_k[row] = end - 1
        query_seqlens[row] = chunk.length
    return StepInputs(input_ids, position_ids, seqlens_k, query_seqlens, first_slot=call.first_slot)
