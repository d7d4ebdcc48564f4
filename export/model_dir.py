"""Build a model dir from a checkpoint dir: the contract of server/contract.py.

Everything is written into a temporary sibling folder and renamed into place
only after the verification pass succeeds, so a failed export leaves nothing
behind that a server could mistake for a model.
"""
from __future__ import annotations

import platform
import shutil
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime
import torch
from tokenizers import Tokenizer

from server import contract
from server.contract import ModelCard
from export.errors import ExportError
from export.genai import write_genai_files
from export.legacy_gqa import legacy_graph
from export.onnx_export import export_onnx
from export.verify import verify
from model.checkpoint import TOKENIZER, read_checkpoint_meta, load_checkpoint, replace_dir
from model.config import ModelConfig
from server.runner import RunnerError

EXPORTER_VERSION = "attnserve-export 0.1.0"
DTYPES = ("float32", "float16")
# fp32 bounds on max |logit difference| against PyTorch: the seed-style model is
# small and exact to ~1e-6; imported models are deeper and larger-valued.
BOUNDS = {"transformer": 1e-4, "llama": 1e-3}
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


def verification_bound(architecture_name: str, dtype: str) -> float | None:
    """The fp32 bound; None for fp16, whose bound export/verify.py derives from the logits."""
    return BOUNDS[architecture_name] if dtype == "float32" else None


def build_model_dir(checkpoint_dir: Path, out_dir: Path, log=print, dtype: str = "float32",
                    verify_device: str = "cpu") -> ModelCard:
    """Export, verify against PyTorch (on verify_device's execution provider), then move into place."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if verify_device != "cpu" and dtype == "float32":
        raise ExportError(f"an fp32 model dir is served on the CPU only (onnxruntime has no fp32 GroupQueryAttention "
                          f"for {verify_device}): verify it on cpu, or export with --dtype fp16")
    meta = read_checkpoint_meta(checkpoint_dir)
    tokenizer_json = (Path(checkpoint_dir) / TOKENIZER).read_text()
    check_tokenizer(tokenizer_json, meta["model"])
    model, config = load_checkpoint(checkpoint_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; servers often run as another user
    try:
        started = time.perf_counter()
        log(f"exporting {config.name} ({model.num_parameters() / 1e6:.1f}M parameters) to ONNX in {dtype} ...")
        export_onnx(model, tmp / contract.MODEL_FILE, dtype)
        gqa_nodes = count_ops(tmp / contract.MODEL_FILE).get("GroupQueryAttention", 0)
        if gqa_nodes != config.n_layers:
            raise ExportError(f"the graph has {gqa_nodes} GroupQueryAttention nodes, expected one per layer ({config.n_layers})")
        # The graph for runtimes whose GroupQueryAttention lacks query_seqlens, beside it; the weights
        # (model.onnx.data) are shared, not copied.
        onnx.save(legacy_graph(tmp / contract.MODEL_FILE), str(tmp / contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS))
        (tmp / contract.TOKENIZER_FILE).write_text(tokenizer_json)
        card = make_card(config, meta, verification={}, dtype=dtype)
        (tmp / contract.CARD_FILE).write_text(card.to_json())
        log(f"exported in {time.perf_counter() - started:.1f} s; verifying against PyTorch (fp32) ...")
        try:
            figures = verify(model, tmp, card, bound=verification_bound(card.architecture, dtype), device=verify_device)
        except RunnerError as e:  # onnxruntime cannot run the graph there: the device, not the export, is at fault
            raise ExportError(f"cannot verify on {verify_device}: {e}") from None
        card = make_card(config, meta, verification=figures, dtype=dtype)
        (tmp / contract.CARD_FILE).write_text(card.to_json())
        write_genai_files(tmp, card)
        log(format_figures(figures))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def make_card(config: ModelConfig, meta: dict, verification: dict, dtype: str = "float32") -> ModelCard:
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
        },
        verification=verification,
        graphs={"with_query_seqlens": contract.MODEL_FILE,
                "without_query_seqlens": contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS},
    )


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
    if figures["dtype"] == "float32":
        return diffs + ("greedy {greedy_tokens} tokens through the cache == full recomputation: "
                        "{greedy_cache_equals_recompute}").format(**figures)
    divergence = figures["greedy_first_divergence"]
    return diffs + (
        "teacher-forced {greedy_tokens} tokens: max |logit diff| {teacher_forced_max_abs_diff:.2e}, "
        "top-1 agreement with fp32 {teacher_forced_top1_agreement:.1%}; "
    ).format(**figures) + (f"greedy tokens equal fp32's up to token {divergence}" if divergence is not None
                           else f"greedy {figures['greedy_tokens']} tokens == fp32's")
