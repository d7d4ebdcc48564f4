"""Model dirs of the kinds without a KV cache: sentence encoders and image classifiers.

    checkpoint ─► EncoderGraph (model.encode) or ClassifierGraph (model.classify)
        ─► torch.onnx.export (dynamo; batch and length dynamic) ─► model.onnx + model.onnx.data
        ─► onnxruntime, batched and padded, against the reference ─► attnserve.json (EncoderCard)
        ─► renamed into place only once every figure meets its bound

An encoder's reference is transformers on the source folder when there is one (export/bert.py),
else the PyTorch module; a classifier's is the PyTorch module, on the held-out digits it never
trained on. The graphs are those of server/contract.py's docstring: pooling and L2 normalization
happen inside the encoder graph, so the server only tokenizes, pads and feeds it.

Attention is left in standard ONNX operators (MatMul, Softmax, Where), as the exporter writes it
(the card's exporter.attention: "onnx"). Measured against com.microsoft.MultiHeadAttention in the
same graph (a custom op mapped like export/gqa_translation.py's), all-MiniLM-L6-v2, batch 32 x 32
padded (23 valid tokens on average), interleaved, medians after warm-up, AVX-512, other jobs running:
154.7 against 154.7 ms on 2 threads (150 calls each), 204.0 against 210.4 ms on 1 thread (100 calls);
the embeddings were bitwise equal. onnxruntime fuses the rest itself (SkipLayerNormalization,
BiasGelu, FusedMatMul), and its transformers optimizer (model_type "bert") finds no attention
pattern to fuse in the dynamo graph; so the simpler graph stays.
"""
from __future__ import annotations

import json
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import onnxruntime
import torch
from tokenizers import Tokenizer

from export.errors import ExportError
from export.model_dir import EXPORTER_VERSION
from export.onnx_export import _quiet_exporter_logs
from export.sentences import tiny_wordpiece_tokenizer, verification_sentences
from model.checkpoint import TOKENIZER, load_checkpoint, read_checkpoint_meta, save_checkpoint, staging_dir
from model.config import preset
from model.transformer import Transformer
from server import contract
from server.contract import EncoderCard
from server.probe import cpu_flags  # the flags that decide onnxruntime's kernels, as the decoder's card records
from server.runner import session_options

# Every sentence's embedding must point where the reference's does ...
MIN_COSINE = 0.99999
# ... and no component may differ by more than this. fp32 embeddings of unit length: measured 3.2e-7
# (MiniLM against transformers, 100 sentences) and 8.9e-8 (test-encoder against PyTorch, AVX-512);
# the bound leaves a margin of 30x over the larger for other CPUs' kernels.
MAX_EMBEDDING_DIFF = 1e-5
# Classifier logits (magnitudes up to ~10): measured 5.0e-6 batched and single on the 360 held-out digits;
# 20x margin, and the seed-style decoder's bound.
MAX_LOGIT_DIFF = 1e-4
VERIFY_BATCH = 16  # sentences per onnxruntime call: rows of mixed lengths, padded to the longest

Reference = Callable[[list[list[int]], list[list[int]]], np.ndarray]  # per sentence ids, type ids -> (N, D)


# --------------------------------------------------------------------------- graphs

class EncoderGraph(torch.nn.Module):
    """forward(input_ids, attention_mask, token_type_ids) int64 (B, T) -> embeddings float32 (B, D)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model.encode(input_ids, attention_mask, token_type_ids)


class ClassifierGraph(torch.nn.Module):
    """forward(pixel_values) float32 (B, C, H, W) -> logits float32 (B, n_labels)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.classify(pixel_values)


def export_graph(graph: torch.nn.Module, example: tuple, path: Path, input_names, output_names, dynamic_shapes) -> None:
    with warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.eval(), example, str(path), dynamo=True, input_names=list(input_names),
                          output_names=list(output_names), dynamic_shapes=dynamic_shapes, external_data=True,
                          optimize=True, verbose=False)


def export_encoder(model: Transformer, path: Path) -> None:
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    input_ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0  # the values only need to be valid; every size is dynamic
    export_graph(EncoderGraph(model), (input_ids, attention_mask, torch.zeros_like(input_ids)), path,
                 contract.ENCODER_INPUTS, [contract.EMBEDDINGS], ({0: batch, 1: length},) * 3)


def export_classifier(model: Transformer, path: Path) -> None:
    c = model.config
    example = torch.zeros(2, c.channels, c.image_size, c.image_size)
    export_graph(ClassifierGraph(model), (example,), path, [contract.PIXEL_VALUES], [contract.LOGITS],
                 ({0: torch.export.Dim("batch")},))


def new_session(model_dir: Path) -> onnxruntime.InferenceSession:
    """The graph as the server runs it: its session options, the CPU."""
    return onnxruntime.InferenceSession(str(Path(model_dir) / contract.MODEL_FILE), session_options(),
                                        providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- tokenizers and references

def serving_tokenizer(tokenizer_json: str, vocab_size: int) -> str:
    """The tokenizer.json a dir ships: truncation and padding removed (the server decides both), and
    checked to add the special tokens itself, as the graph expects ([CLS] ... [SEP] for BERT)."""
    try:
        data = json.loads(tokenizer_json)
        data["truncation"], data["padding"] = None, None
        tokenizer = Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # tokenizers raises a bare Exception for files it cannot parse
        raise ExportError(f"tokenizer.json cannot be read ({e})") from None
    mask = tokenizer.encode("a").special_tokens_mask
    if len(mask) < 3 or not (mask[0] and mask[-1]):
        raise ExportError("tokenizer.json's post-processor does not add special tokens around a text "
                          "([CLS] ... [SEP]); the encoder was trained with them")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ExportError(f"the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}: "
                          "they come from different models")
    return tokenizer.to_str()


def pad_batch(ids: list[list[int]], type_ids: list[list[int]]) -> dict[str, np.ndarray]:
    """Right-padded int64 [B, T] inputs, as the server feeds them (padding id 0, attention_mask 0)."""
    width = max(map(len, ids))
    feeds = {name: np.zeros((len(ids), width), dtype=np.int64) for name in contract.ENCODER_INPUTS}
    for row, (tokens, types) in enumerate(zip(ids, type_ids)):
        feeds[contract.INPUT_IDS][row, :len(tokens)] = tokens
        feeds[contract.ATTENTION_MASK][row, :len(tokens)] = 1
        feeds[contract.TOKEN_TYPE_IDS][row, :len(tokens)] = types
    return feeds


def pytorch_reference(model: Transformer) -> Reference:
    """The PyTorch module, one sentence at a time (no padding)."""

    @torch.no_grad()
    def reference(ids, type_ids):
        return np.concatenate([model.encode(torch.tensor([t]), None, torch.tensor([y])).numpy()
                               for t, y in zip(ids, type_ids)])

    return reference


# --------------------------------------------------------------------------- verification

def verify_encoder(model_dir: Path, texts: list[str], reference: Reference, reference_name: str,
                   max_tokens: int) -> dict:
    """onnxruntime in padded batches of mixed lengths against the reference, one unpadded sentence at a time.

    Sentences longer than max_tokens are truncated to it, special tokens kept, as a server may do.
    """
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / contract.TOKENIZER_FILE))
    tokenizer.enable_truncation(max_tokens)
    encodings = tokenizer.encode_batch(texts)
    ids, type_ids = [e.ids for e in encodings], [e.type_ids for e in encodings]
    longest = max(map(len, ids))
    session = new_session(model_dir)
    starts = range(0, len(ids), VERIFY_BATCH)
    batches = [pad_batch(ids[i:i + VERIFY_BATCH], type_ids[i:i + VERIFY_BATCH]) for i in starts]
    got = np.concatenate([session.run([contract.EMBEDDINGS], feeds)[0] for feeds in batches])  # (N, D)
    want = reference(ids, type_ids)  # (N, D)
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))  # (N,)
    # A row of padding alone (an empty input) must come out finite, not NaN.
    empty = pad_batch([ids[0], [0]], [type_ids[0], [0]])
    empty[contract.ATTENTION_MASK][1] = 0
    empty_row = session.run([contract.EMBEDDINGS], empty)[0][1]
    figures = {
        "reference": reference_name, "sentences": len(texts), "batch": VERIFY_BATCH,
        "tokens_min": min(map(len, ids)), "tokens_max": longest,
        "truncated": sum(bool(e.overflowing) for e in encodings),
        "cosine_min": round(float(cosine.min()), 8), "cosine_bound": MIN_COSINE,
        "max_abs_diff": float(f"{np.abs(got - want).max():.3e}"), "max_abs_diff_bound": MAX_EMBEDDING_DIFF,
        "padding_row_finite": bool(np.isfinite(empty_row).all()),
    }
    if not figures["cosine_min"] >= MIN_COSINE or not figures["max_abs_diff"] <= MAX_EMBEDDING_DIFF:
        raise ExportError(f"the exported encoder disagrees with {reference_name}: cosine min {figures['cosine_min']} "
                          f"(bound {MIN_COSINE}), max |diff| {figures['max_abs_diff']:.2e} "
                          f"(bound {MAX_EMBEDDING_DIFF:g})")
    if not figures["padding_row_finite"]:
        raise ExportError("the exported encoder returns non-finite embeddings for a row of padding alone")
    return figures


@torch.no_grad()
def verify_classifier(model_dir: Path, model: Transformer, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict:
    """onnxruntime against PyTorch on held-out images: all in one batch, and one image at a time."""
    session = new_session(model_dir)
    want = model.classify(pixel_values).numpy()  # (N, n_labels)
    batched = session.run([contract.LOGITS], {contract.PIXEL_VALUES: pixel_values.numpy()})[0]
    single = np.concatenate([session.run([contract.LOGITS], {contract.PIXEL_VALUES: pixel_values[i:i + 1].numpy()})[0]
                             for i in range(len(pixel_values))])
    figures = {
        "reference": "attnserve PyTorch", "images": len(labels),
        "batched_max_abs_diff": float(f"{np.abs(batched - want).max():.3e}"),
        "single_max_abs_diff": float(f"{np.abs(single - want).max():.3e}"),
        "max_abs_diff_bound": MAX_LOGIT_DIFF,
        "accuracy_onnxruntime": round(float((batched.argmax(-1) == labels.numpy()).mean()), 4),
        "accuracy_pytorch": round(float((want.argmax(-1) == labels.numpy()).mean()), 4),
    }
    worst = max(figures["batched_max_abs_diff"], figures["single_max_abs_diff"])
    if not worst <= MAX_LOGIT_DIFF:
        raise ExportError(f"the exported classifier disagrees with PyTorch: max |logit diff| {worst:.2e} "
                          f"(bound {MAX_LOGIT_DIFF:g})")
    return figures


# --------------------------------------------------------------------------- model dirs

def exporter_info(attention: str) -> dict:
    return {"version": EXPORTER_VERSION, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), "attention": attention}


def build_encoder_dir(checkpoint_dir: Path, out_dir: Path, *, reference: Optional[Reference] = None,
                      reference_name: str = "attnserve PyTorch", texts: Optional[list[str]] = None,
                      log=print) -> EncoderCard:
    """An encoder checkpoint (embedding head) -> a verified encoder model dir at out_dir.

    The checkpoint's config.json may hold `max_tokens` (and `max_tokens_reason`) and `source`;
    max_tokens defaults to the model's positions. reference: default the PyTorch module.
    """
    meta = read_checkpoint_meta(checkpoint_dir)
    model, config = load_checkpoint(checkpoint_dir)
    if config.head != "embedding":
        raise ExportError(f"checkpoint {checkpoint_dir} has head {config.head!r}, not an encoder's embedding head")
    max_tokens = int(meta.get("max_tokens") or config.max_positions)
    if not 2 < max_tokens <= config.max_positions:
        raise ExportError(f"max_tokens {max_tokens} must lie in 3..{config.max_positions} (the model's positions)")
    tokenizer_json = serving_tokenizer((Path(checkpoint_dir) / TOKENIZER).read_text(), config.vocab_size)
    texts = texts or verification_sentences()
    with staging_dir(out_dir) as tmp:
        log(f"exporting {config.name} ({model.num_parameters() / 1e6:.1f}M parameters) to ONNX ...")
        export_encoder(model, tmp / contract.MODEL_FILE)
        (tmp / contract.TOKENIZER_FILE).write_text(tokenizer_json)
        log(f"verifying against {reference_name} on {len(texts)} sentences ...")
        figures = verify_encoder(tmp, texts, reference or pytorch_reference(model), reference_name, max_tokens)
        figures["cpu_flags"] = cpu_flags()
        source = dict(meta.get("source") or {})
        if meta.get("max_tokens_reason"):
            source["max_tokens"] = meta["max_tokens_reason"]
        card = EncoderCard(
            name=config.name, kind=contract.KIND_ENCODER, dtype="float32", inputs=list(contract.ENCODER_INPUTS),
            outputs=[contract.EMBEDDINGS], model=config.to_dict(), exporter=exporter_info("onnx"),
            verification=figures, max_tokens=max_tokens, embedding_dim=config.d_model, pooling=config.pooling,
            normalized=config.normalize_embeddings, source=source,
        )
        (tmp / contract.CARD_FILE).write_text(card.to_json())
        log(f"verification (onnxruntime vs {reference_name}, {len(texts)} sentences of {figures['tokens_min']}.."
            f"{figures['tokens_max']} tokens in padded batches of {VERIFY_BATCH}): "
            f"cosine min {figures['cosine_min']:.8f} (bound {MIN_COSINE}), "
            f"max |diff| {figures['max_abs_diff']:.2e} (bound {MAX_EMBEDDING_DIFF:g})")
    return card


def build_image_classifier_dir(checkpoint_dir: Path, out_dir: Path, log=print) -> EncoderCard:
    """A checkpoint of model/digits.py -> a verified image-classifier model dir at out_dir."""
    from model.digits import load_classifier_checkpoint, load_split, normalize

    model, meta = load_classifier_checkpoint(checkpoint_dir)
    config = meta["model"]
    split = load_split(meta["split"]["seed"], meta["split"]["test_fraction"])
    with staging_dir(out_dir) as tmp:
        log(f"exporting {config.name} ({model.num_parameters() / 1e3:.0f}K parameters) to ONNX ...")
        export_classifier(model, tmp / contract.MODEL_FILE)
        figures = verify_classifier(tmp, model, normalize(split.test_x, meta["image"]), split.test_y)
        figures["cpu_flags"] = cpu_flags()
        source = {"split": meta["split"], "training": meta.get("training", {})}
        card = EncoderCard(
            name=config.name, kind=contract.KIND_IMAGE_CLASSIFIER, dtype="float32", inputs=[contract.PIXEL_VALUES],
            outputs=[contract.LOGITS], model=config.to_dict(), exporter=exporter_info("onnx"),
            verification=figures, labels=list(meta["labels"]), image=dict(meta["image"]), source=source,
        )
        (tmp / contract.CARD_FILE).write_text(card.to_json())
        log(f"verification (onnxruntime vs PyTorch, {figures['images']} held-out images): max |logit diff| batched "
            f"{figures['batched_max_abs_diff']:.2e}, single {figures['single_max_abs_diff']:.2e} (bound "
            f"{MAX_LOGIT_DIFF:g}); held-out accuracy {figures['accuracy_onnxruntime']:.2%}")
    return card


def build_test_encoder_dir(out_dir: Path, seed: int = 0) -> Path:
    """The `test-encoder` preset with random weights (seeded), exported and verified: a few seconds."""
    torch.manual_seed(seed)
    model = Transformer(preset("test-encoder")).eval()
    tokenizer = tiny_wordpiece_tokenizer()
    with tempfile.TemporaryDirectory(prefix="attnserve-test-encoder-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        save_checkpoint(checkpoint, model, tokenizer.to_str(), {"pad_token_id": 0, "unk_token_id": 1},
                        extra={"source": {"weights": f"random, torch.manual_seed({seed})"}})
        build_encoder_dir(checkpoint, out_dir, texts=verification_sentences(count=24, seed=seed), log=lambda *_: None)
    return Path(out_dir)


def build_test_classifier_dir(out_dir: Path, seed: int = 0, steps: int = 300) -> Path:
    """The `vit-digits` preset trained briefly (300 steps: about 10 s and 86-94 % held out), exported."""
    from model.digits import train_digits

    with tempfile.TemporaryDirectory(prefix="attnserve-test-classifier-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        # A short run learns faster at twice the full run's peak rate (measured at 200 steps, seeds 0-4:
        # 74-88 % held out against 70-76 %).
        train_digits(checkpoint, steps=steps, seed=seed, lr=4e-3, log=lambda *_: None)
        build_image_classifier_dir(checkpoint, out_dir, log=lambda *_: None)
    return Path(out_dir)
