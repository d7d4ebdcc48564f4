"""The serving-graph contract between export/ and server/: names and the model card.

A leaf module: pure Python, importing nothing of attnserve's and no torch,
onnx or onnxruntime. The exporter writes graphs with these names, the server
binds them, and the model card (`attnserve.json`) records them so that a
server can refuse a model dir that disagrees.

Per call, B = KV slots in the call, S = padded chunk length, M = slot capacity:

    input_ids               int64 [B, S]   new tokens, right-padded
    position_ids            int64 [B, S]   absolute positions of the new tokens
    seqlens_k               int32 [B]      tokens in the cache after this call, minus one
    total_sequence_length   int32 []       an upper bound of seqlens_k + 1 (M)
    query_seqlens           int32 [B]      valid new tokens per row; 0 = idle row
    past_key_values.{i}.key/.value   float [B, Hkv, M, hd]   bound to the same buffers as
    present.{i}.key/.value           float [B, Hkv, M, hd]   (written in place)
    logits                  float [B, V]   of each row's last valid token

Model dirs of the other kinds (the card's `kind`) have graphs without a KV cache, batch B and
length T dynamic:

    encoder:           input_ids, attention_mask (1 = token, 0 = padding), token_type_ids   int64 [B, T]
                       -> embeddings       float32 [B, D]   pooled (card: pooling), L2-normalized if card.normalized
    image-classifier:  pixel_values        float32 [B, C, H, W]   preprocessed as the card's `image` says
                       -> logits           float32 [B, n_labels]  (softmax gives the probabilities)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MODEL_FILE = "model.onnx"
# The same graph and weights (model.onnx.data, shared) for a GroupQueryAttention that lacks
# `query_seqlens` (onnxruntime 1.31 and older; the newest onnxruntime-gpu): served with
# uniform calls, in which every row brings the call's full width of new tokens.
MODEL_FILE_WITHOUT_QUERY_SEQLENS = "model_without_query_seqlens.onnx"
# The inspection graph (export/inspection.py): the graph without query_seqlens, whose GroupQueryAttention
# nodes also return their softmax probabilities as `attention.{i}` float32 [B, H, S, total_sequence_length];
# same inputs, same weights (model.onnx.data). Listed in the card's graphs as "inspection"; older dirs lack it.
INSPECTION_MODEL_FILE = "model_inspection.onnx"
INSPECTION_GRAPH = "inspection"
CARD_FILE = "attnserve.json"
TOKENIZER_FILE = "tokenizer.json"
GENAI_CONFIG_FILE = "genai_config.json"
# PyTorch's logits for the start-up probe (server/probe.py), float32 [probe rows, V], numpy .npy.
PROBE_FILE = "probe_logits.npy"
CARD_FORMAT = 1

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
QUERY_SEQLENS = "query_seqlens"
LOGITS = "logits"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
EMBEDDINGS = "embeddings"
PIXEL_VALUES = "pixel_values"

# What a model dir serves (the card's `kind`; absent in decoder dirs exported before the other kinds).
KIND_DECODER = "decoder"
KIND_ENCODER = "encoder"
KIND_IMAGE_CLASSIFIER = "image-classifier"
KINDS = (KIND_DECODER, KIND_ENCODER, KIND_IMAGE_CLASSIFIER)
ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
POOLINGS = ("mean", "cls")

# com.microsoft.GroupQueryAttention's inputs, in onnxruntime 1.32's order. Optional inputs the
# serving graph skips are left empty in the node, so an input's index in this list is its
# position in every GroupQueryAttention node. Builds before 1.32 define only the first 16.
GQA_INPUTS = (
    "query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
    "cos_cache", "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale",
    "q_norm_weight", "k_norm_weight", "query_seqlens",
)
QUERY_SEQLENS_INDEX = GQA_INPUTS.index("query_seqlens")


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


def attention_output(layer: int) -> str:
    """The inspection graph's attention probabilities of one layer."""
    return f"attention.{layer}"


def input_names(n_layers: int) -> list[str]:
    names = [INPUT_IDS, POSITION_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, QUERY_SEQLENS]
    for i in range(n_layers):
        names += [past_key(i), past_value(i)]
    return names


def output_names(n_layers: int) -> list[str]:
    names = [LOGITS]
    for i in range(n_layers):
        names += [present_key(i), present_value(i)]
    return names


@dataclass(frozen=True)
class ModelCard:
    """What `attnserve.json` says about a model dir; written by export/, read by server/."""

    name: str
    architecture: str  # "transformer" (seed-style) or "llama"
    dtype: str  # "float32" or "float16": weights and KV cache
    vocab_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_positions: int
    special_tokens: dict  # bos_token_id, eos_token_id, pad_token_id (ints or None)
    chat_template: Optional[str]
    inputs: list
    outputs: list
    model: dict  # the full ModelConfig, for tools that rebuild the PyTorch module
    exporter: dict  # versions that produced the dir
    verification: dict  # figures measured at export, with their bounds
    format: int = CARD_FORMAT
    # The serving graphs in the dir, by the GroupQueryAttention they need: "with_query_seqlens" and
    # "without_query_seqlens" (file names). Dirs exported before this field held model.onnx alone.
    graphs: dict = dataclasses.field(default_factory=lambda: {"with_query_seqlens": MODEL_FILE})
    # The start-up probe (server/probe.py): prompt_ids, decode_ids, file (PROBE_FILE), bound, and the figure and CPU
    # flags measured at export. None in dirs exported before it: they are served with a warning.
    probe: Optional[dict] = None
    # Block-quantized weights (export/quantize.py: weights_card): scheme, block_size, accuracy_level, source,
    # per tensor kind the op, bits, zero points and origin of the blocks, and the dir's bytes. Empty: float weights.
    weights: dict = dataclasses.field(default_factory=dict)
    kind: str = KIND_DECODER

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        return _card_from_json(cls, text)

    @classmethod
    def load(cls, model_dir) -> "ModelCard":
        return cls.from_json((Path(model_dir) / CARD_FILE).read_text())

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.special_tokens.get("eos_token_id")
        return [eos] if isinstance(eos, int) else list(eos or [])


def _card_from_json(cls, text: str):
    """A card dataclass from attnserve.json's text: the format checked, every required field present;
    fields this version does not know are ignored (a newer exporter's additions)."""
    data = json.loads(text)
    if data.get("format") != CARD_FORMAT:
        raise ValueError(f"model card format {data.get('format')!r} is not {CARD_FORMAT}; re-export the model dir")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"model card lacks {', '.join(missing)}; re-export the model dir")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def card_kind(model_dir) -> str:
    """The kind of model a dir serves, read before choosing which card class loads it."""
    try:
        data = json.loads((Path(model_dir) / CARD_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{CARD_FILE} cannot be read: {e}") from None
    kind = data.get("kind", KIND_DECODER) if isinstance(data, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{CARD_FILE} has kind {kind!r}; this server serves {', '.join(KINDS)}")
    return kind


@dataclass(frozen=True)
class EncoderCard:
    """`attnserve.json` of an encoder or image-classifier dir: a graph without a KV cache (module docstring).

    An encoder embeds text: the server tokenizes with the dir's tokenizer.json (its post-processor adds
    the special tokens), refuses or truncates inputs longer than max_tokens, and feeds the three
    ENCODER_INPUTS. An image classifier takes images preprocessed as `image` says:
        {"height": H, "width": W, "channels": C,      # resized to H x W, C = 1 (grayscale) or 3 (RGB)
         "scale": s, "mean": [C floats], "std": [C floats]}   # pixel_values = (uint8 / 255 * s - mean) / std
    """

    name: str
    kind: str  # KIND_ENCODER or KIND_IMAGE_CLASSIFIER
    dtype: str  # "float32"
    inputs: list
    outputs: list
    model: dict  # the full ModelConfig
    exporter: dict
    verification: dict  # figures measured at export against the reference, with their bounds
    max_tokens: int = 0  # encoder: longest input, special tokens included
    embedding_dim: int = 0  # encoder: D of `embeddings`
    pooling: str = ""  # encoder: one of POOLINGS
    normalized: bool = False  # encoder: embeddings have unit L2 norm
    labels: list = dataclasses.field(default_factory=list)  # image classifier: label of each logit
    image: dict = dataclasses.field(default_factory=dict)  # image classifier: preprocessing (class docstring)
    source: dict = dataclasses.field(default_factory=dict)  # where the weights came from (package, hashes checked)
    format: int = CARD_FORMAT

    def __post_init__(self):
        if self.kind not in (KIND_ENCODER, KIND_IMAGE_CLASSIFIER):
            raise ValueError(f"an EncoderCard's kind is {KIND_ENCODER} or {KIND_IMAGE_CLASSIFIER}, got {self.kind!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "EncoderCard":
        return _card_from_json(cls, text)

    @classmethod
    def load(cls, model_dir) -> "EncoderCard":
        return cls.from_json((Path(model_dir) / CARD_FILE).read_text())
