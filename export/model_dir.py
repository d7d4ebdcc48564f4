"""Build a model dir from a checkpoint dir: the contract of server/contract.py.

Everything is written into a temporary sibling folder and renamed into place
only after the verification pass succeeds, so a failed export leaves nothing
behind that a server could mistake for a model.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Optional

import onnx
import onnxruntime
import torch
from tokenizers import Tokenizer

from server import contract
from server.contract import ModelCard
from export.errors import ExportError
from export.genai import write_genai_files
from export.inspection import write_inspection_graph
from export.legacy_gqa import legacy_graph
from export.onnx_export import export_onnx, optimize_graph_file
from export import quantize
from export.probe import write_probe
from export.verify import verify
from model.checkpoint import TOKENIZER, read_checkpoint_meta, load_checkpoint, staging_dir
from model.config import ModelConfig
from server.runner import RunnerError, missing_quantized_ops

EXPORTER_VERSION = "attnserve-export 0.1.0"
DTYPES = ("float32", "float16")
# fp32 bounds on max |logit difference| against PyTorch: the seed-style model is
# small and exact to ~1e-6; imported models are deeper and larger-valued.
BOUNDS = {"transformer": 1e-4, "llama": 1e-3}
# MatMulNBits' accuracy_level for --weights int8/int4 (export/verify.py: bounds by level; docs/quantization.md: speed).
DEFAULT_ACCURACY_LEVEL = 4
# fp16 graphs against the same fp32 PyTorch module get no fixed bound: it is derived
# from the model's logit scale during verification (export/verify.py: fp16_bound,
# with the measured distribution it is checked against).


def architecture(config: ModelConfig) -> str:
    return "llama" if config.positional == "rope" else "transformer"


def check_tokenizer(tokenizer_json: str, config: ModelConfig) -> None:
    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise ExportError(f"tokenizer.json cannot be read ({e}); train or import the checkpoint again") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise ExportError(
            f"the tokenizer has {size} tokens but the model's vocabulary has {config.vocab_size}: "
            "they come from different models; put the checkpoint's own tokenizer.json back"
        )


def verification_bound(architecture_name: str, dtype: str, weights: Optional[dict] = None) -> float | None:
    """The fp32 bound; None for fp16 and for int8 activations (accuracy_level 4), whose bounds
    export/verify.py derives from the logits. Quantized weights at accuracy_level 0 are dequantized
    to fp32 and multiplied in fp32 against PyTorch holding the same dequantized weights: fp32's bound."""
    if dtype != "float32" or (weights or {}).get("accuracy_level", 0) != 0:
        return None
    return BOUNDS[architecture_name]


def check_weights(weights: str, dtype: str, accuracy_level: int) -> None:
    if weights not in quantize.SCHEMES:
        raise ExportError(f"--weights must be one of {', '.join(quantize.SCHEMES)}, got {weights!r}")
    if accuracy_level not in quantize.ACCURACY_LEVELS:
        raise ExportError(f"--accuracy-level must be one of {', '.join(map(str, quantize.ACCURACY_LEVELS))}, "
                          f"got {accuracy_level}")
    if weights != "fp32" and dtype != "float32":
        raise ExportError(f"--weights {weights} takes fp32 activations and KV cache: export it with --dtype fp32")
    missing = missing_quantized_ops() if weights != "fp32" else []
    if missing:
        raise ExportError(f"onnxruntime {onnxruntime.__version__} has no {', '.join(missing)} (com.microsoft): "
                          f"it cannot run --weights {weights}; install onnxruntime >= 1.20 or export --weights fp32")


def dir_bytes(folder: Path) -> int:
    """Bytes of every file in the model dir but its card (which records this figure)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.name != contract.CARD_FILE)


def build_model_dir(checkpoint_dir: Path, out_dir: Path, log=print, dtype: str = "float32",
                    verify_device: str = "cpu", weights: str = "fp32",
                    accuracy_level: int = DEFAULT_ACCURACY_LEVEL, gguf_blocks: Optional[dict] = None,
                    q4_1: str = "offsets", head_bits: int = 8) -> ModelCard:
    """Export, verify against PyTorch (on verify_device's execution provider), then move into place.

    weights "int8" / "int4": block-quantized weights (export/quantize.py), from gguf_blocks where the
    GGUF's own blocks fit (export/gguf_blocks.py), verified against PyTorch holding the same weights;
    head_bits 4 rounds the LM head to 4 bits (default 8).
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_weights(weights, dtype, accuracy_level)
    if verify_device != "cpu" and dtype == "float32":
        raise ExportError(f"an fp32 model dir is served on the CPU only (onnxruntime has no fp32 GroupQueryAttention "
                          f"for {verify_device}): verify it on cpu, or export with --dtype fp16")
    meta = read_checkpoint_meta(checkpoint_dir)
    tokenizer_json = (Path(checkpoint_dir) / TOKENIZER).read_text()
    check_tokenizer(tokenizer_json, meta["model"])
    model, config = load_checkpoint(checkpoint_dir)
    with staging_dir(out_dir) as tmp:  # renamed onto out_dir only once everything below succeeded
        started = time.perf_counter()
        log(f"exporting {config.name} ({model.num_parameters() / 1e6:.1f}M parameters) to ONNX in {dtype} ...")
        export_onnx(model, tmp / contract.MODEL_FILE, dtype)
        graph_changes = optimize_graph_file(tmp / contract.MODEL_FILE, fuse_projections=weights == "fp32")
        weights_entry = {}
        if weights != "fp32":
            log(f"quantizing the weights to {weights} (accuracy_level {accuracy_level}) ...")
            # From here on, PyTorch holds the graph's own weights, dequantized: that is what it is verified against.
            model, weights_entry = quantize.write_quantized_graph(tmp / contract.MODEL_FILE, model, weights,
                                                                  accuracy_level, gguf_blocks, q4_1, head_bits)
        gqa_nodes = count_ops(tmp / contract.MODEL_FILE).get("GroupQueryAttention", 0)
        if gqa_nodes != config.n_layers:
            raise ExportError(f"the graph has {gqa_nodes} GroupQueryAttention nodes, expected one per layer ({config.n_layers})")
        # The graph for runtimes whose GroupQueryAttention lacks query_seqlens, beside it; the weights
        # (model.onnx.data) are shared, not copied.
        onnx.save(legacy_graph(tmp / contract.MODEL_FILE), str(tmp / contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS))
        (tmp / contract.TOKENIZER_FILE).write_text(tokenizer_json)
        card = make_card(config, meta, verification={}, dtype=dtype, weights=weights_entry,
                         graph_passes=graph_changes)
        (tmp / contract.CARD_FILE).write_text(card.to_json())
        write_inspection_graph(tmp, card)  # attention probabilities for InspectAttention, same weights
        log(f"exported in {time.perf_counter() - started:.1f} s; verifying against PyTorch (fp32) ...")
        try:
            figures = verify(model, tmp, card, bound=verification_bound(card.architecture, dtype, weights_entry),
                             device=verify_device)
        except RunnerError as e:  # onnxruntime cannot run the graph there: the device, not the export, is at fault
            raise ExportError(f"cannot verify on {verify_device}: {e}") from None
        card = make_card(config, meta, verification=figures, dtype=dtype, weights=weights_entry,
                         graph_passes=graph_changes)
        card = dataclasses.replace(card, probe=write_probe(model, tmp, card, tokenizer_json, figures, verify_device))
        (tmp / contract.CARD_FILE).write_text(card.to_json())
        write_genai_files(tmp, card)
        if weights_entry:
            card = dataclasses.replace(card, weights={**weights_entry, "dir_bytes": dir_bytes(tmp)})
            (tmp / contract.CARD_FILE).write_text(card.to_json())
        log(format_figures(figures))
        log(format_probe(card.probe))
    return card


def make_card(config: ModelConfig, meta: dict, verification: dict, dtype: str = "float32",
              weights: Optional[dict] = None, graph_passes: Optional[dict] = None) -> ModelCard:
    return ModelCard(
        name=config.name,
        architecture=architecture(config),
        dtype=dtype,
        vocab_size=config.vocab_size,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_positions=config.max_positions,
        special_tokens=meta.get("special_tokens") or {},
        chat_template=meta.get("chat_template"),
        inputs=contract.input_names(config.n_layers),
        outputs=contract.output_names(config.n_layers),
        model=config.to_dict(),
        exporter={
            "version": EXPORTER_VERSION,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "source": meta.get("source"),
            "graph_passes": graph_passes or {},  # export/graph_passes.py: what each rewrite changed
        },
        verification=verification,
        graphs={"with_query_seqlens": contract.MODEL_FILE,
                "without_query_seqlens": contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS,
                contract.INSPECTION_GRAPH: contract.INSPECTION_MODEL_FILE},
        weights=weights or {},
    )


def format_probe(field: dict) -> str:
    measured = field["export"]
    return (f"start-up probe ({len(field['prompt_ids'])} prompt + {len(field['decode_ids'])} decode tokens): "
            f"max |logit diff| {measured['max_abs_diff']:.2e}, bound {field['bound']:g}, "
            f"CPU flags {' '.join(measured['cpu_flags']) or 'unknown'}")


def count_ops(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def format_figures(figures: dict) -> str:
    diffs = (
        "verification (onnxruntime {dtype} vs PyTorch fp32, max |logit diff|, bound {bound:g}): "
        "prompt {prompt_max_abs_diff:.2e}, decode {decode_max_abs_diff:.2e}, ragged {ragged_max_abs_diff:.2e}; "
    ).format(**figures)
    if "uniform_graph_max_abs_diff" in figures:
        diffs += f"{contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS} vs model.onnx {figures['uniform_graph_max_abs_diff']:.2e}; "
    if "teacher_forced_top1_agreement" not in figures:
        return diffs + ("greedy {greedy_tokens} tokens through the cache == full recomputation: "
                        "{greedy_cache_equals_recompute}").format(**figures)
    divergence = figures["greedy_first_divergence"]
    return diffs + (
        "teacher-forced {greedy_tokens} tokens: max |logit diff| {teacher_forced_max_abs_diff:.2e}, "
        "top-1 agreement with fp32 {teacher_forced_top1_agreement:.1%}; "
    ).format(**figures) + (f"greedy tokens equal fp32's up to token {divergence}" if divergence is not None
                           else f"greedy {figures['greedy_tokens']} tokens == fp32's")
