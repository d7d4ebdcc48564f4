"""Export the serving graph of a Transformer to ONNX with GroupQueryAttention.

torch.export traces ServingGraph; the custom attention op becomes one
com.microsoft.GroupQueryAttention node per layer (export/gqa_translation.py).
Batch, chunk length and cache capacity stay dynamic, so the server picks its
slot count and capacity at start-up.

dtype "float16" traces a half-precision copy of the model (export/serving.py:
half_precision): weights, activations, the KV cache and GroupQueryAttention in
fp16, RMSNorm statistics in fp32, logits cast to float32 inside the graph.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from export import gqa_translation, graph_passes
from server import contract
from export.serving import ServingGraph, half_precision
from model.transformer import Transformer

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def example_inputs(model: Transformer, batch: int = 2, chunk: int = 5, capacity: int = 32,
                   dtype: torch.dtype = torch.float32):
    """Inputs of the traced call; the values only need to be valid, every size is dynamic."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, chunk), generator=generator)
    position_ids = torch.arange(chunk).expand(batch, chunk).contiguous()
    query_seqlens = torch.full((batch,), chunk, dtype=torch.int32)
    past_shape = (batch, config.n_kv_heads, capacity, config.head_dim)
    past = tuple(torch.zeros(past_shape, dtype=dtype) for _ in range(2 * config.n_layers))
    return (input_ids, position_ids, query_seqlens - 1, torch.tensor(capacity, dtype=torch.int32), query_seqlens, *past)


def export_onnx(model: Transformer, path: Path, dtype: str = "float32") -> Path:
    """Write model.onnx (+ model.onnx.data with the weights) to path; dtype is "float32" or "float16"."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = model.config
    graph = ServingGraph(half_precision(model) if dtype == "float16" else model).eval()
    batch, chunk, capacity = torch.export.Dim("batch"), torch.export.Dim("chunk"), torch.export.Dim("capacity")
    cache_dims = tuple({0: batch, 2: capacity} for _ in range(2 * config.n_layers))
    dynamic_shapes = ({0: batch, 1: chunk}, {0: batch, 1: chunk}, {0: batch}, None, {0: batch}, cache_dims)
    with warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example_inputs(model, dtype=DTYPES[dtype]),
            str(path),
            dynamo=True,
            input_names=contract.input_names(config.n_layers),
            output_names=contract.output_names(config.n_layers),
            dynamic_shapes=dynamic_shapes,
            custom_translation_table={
                torch.ops.attnserve.group_query_attention.default: gqa_translation.group_query_attention
            },
            external_data=True,
            optimize=True,
            verbose=False,
        )
    return Path(path)


def optimize_graph_file(path: Path, fuse_projections: bool) -> dict:
    """Rewrite the exported graph at path (and its .data) with export/graph_passes.py's float passes."""
    path = Path(path)
    proto = onnx.load(str(path))
    done = graph_passes.optimize_float_graph(proto, fuse_projections)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    data.chmod(0o644)  # onnx writes it private; servers often run as another user
    return done


class _quiet_exporter_logs:
    """The exporter logs every skipped torchvision op at WARNING; keep the CLI output readable."""

    def __enter__(self):
        self.logger = logging.getLogger("torch.onnx")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
