"""Make a model dir usable by onnxruntime-genai, the benchmark's peer.

genai drives a decoder through its own interface: it feeds `attention_mask`
[B, T] (1 = a token in the cache or in this call, 0 = padding) where our
serving graph takes `seqlens_k`, `total_sequence_length`, `query_seqlens` and
`position_ids`, and it reads `logits` as [B, S, V], picking each row's last
valid token itself. Rather than export a second model, this module derives a
thin wrapper graph from model.onnx by graph surgery: the same nodes, the same
weights (the wrapper sits beside model.onnx and points at the same
model.onnx.data, so nothing is copied), plus a few nodes that compute our
inputs from the mask, as genai's own model builder does for its
GroupQueryAttention models (seqlens_k = ReduceSum(mask) - 1, total length =
the mask's width):

    attention_mask [B, T] ─┬─ ReduceSum(axis 1) = kv_len [B] ── -1, max 0 ───────────► seqlens_k
                           └─ width T ──────────────────────────────────────────────► total_sequence_length
    input_ids [B, S] ── width S
    new = (T == S) ? kv_len : S ────────────────────────────────────────────────────► query_seqlens
    (kv_len - new)[:, None] + Range(S), min max_positions-1 ─────────────────────────► position_ids
    (serving graph, unchanged) ── logits [B, V] ── Unsqueeze, Expand over S ─────────► logits [B, S, V]

Why these rules: genai 0.18 calls a non-paged decoder in two patterns, and
both pad on the right. Its Generator takes a batch of prompts right-padded with
pad_token_id (its mask marks the trailing pad tokens as padding) and then grows
the mask by one column a step. Its Engine, on a non-paged graph, runs static batches
of up to 4 requests that start together: right-padded prompts with mask rows
of 1s for each request's own length, then one token per row (its true
continuous batching, engine.dynamic_batching, needs a paged-attention graph).
So in a first prefill (T == S) each row's new tokens are its kv_len real ones,
and in every later call each row has S new tokens; tests/export/test_genai.py
checks both patterns against our own runner, token for token. The serving
graph writes the new keys and values at each row's own offset kv_len - new and
gives the new tokens the positions GroupQueryAttention uses for its rotary
embedding, so seed-style models (positions added to the embeddings) get
positions that agree with the cache.

Logits: the serving graph already gathers each row's last new token; genai
then reads the row at an index of its own choosing (the Engine: the request's
token count - 1; the Generator: its last non-pad token), so the wrapper
repeats that row over S: every index genai can pick holds the right logits,
at the cost of B*S*V float copies on a prefill and none on a decode step (far
below the S-fold LM head genai's own exports compute). A static [B, 1, V]
output, which genai 0.18 accepts as "trimmed prefill logits", works for its
Generator but not for its Engine, which allocates [B, S, V] for the output.

genai_config.json names the wrapper as the decoder, with past and present on
one shared buffer (`past_present_share_buffer`), the layout GroupQueryAttention
works in place on; genai sizes that buffer by `search.max_length`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server import contract
from server.contract import ModelCard
from export.errors import ExportError

GENAI_MODEL_FILE = "genai_model.onnx"  # beside model.onnx, so its external data path stays "model.onnx.data"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ATTENTION_MASK = "attention_mask"
DEFAULT_MAX_LENGTH = 2048  # genai's search.max_length default: the KV buffer it allocates per sequence
_PREFIX = "genai_wrapper/"  # names of the added nodes and tensors


def write_genai_files(model_dir: Path, card: ModelCard) -> None:
    """Write genai_config.json, the genai wrapper graph and tokenizer_config.json into model_dir."""
    model_dir = Path(model_dir)
    graph = genai_graph(model_dir / contract.MODEL_FILE, card)
    onnx.save(graph, str(model_dir / GENAI_MODEL_FILE))
    onnx.checker.check_model(str(model_dir / GENAI_MODEL_FILE))  # by path, so it finds model.onnx.data
    config = genai_config(card)
    (model_dir / contract.GENAI_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_json = json.loads((model_dir / contract.TOKENIZER_FILE).read_text())
    (model_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(card, tokenizer_json), indent=2) + "\n")


# --- the wrapper graph -------------------------------------------------------------------------


def genai_graph(model_path: Path, card: ModelCard) -> onnx.ModelProto:
    """model.onnx with genai's interface; the weights stay in model.onnx.data (not loaded here)."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    derived = {contract.POSITION_IDS, contract.SEQLENS_K, contract.TOTAL_SEQUENCE_LENGTH, contract.QUERY_SEQLENS}
    missing = derived - {i.name for i in graph.input}
    if missing:
        raise ExportError(f"{model_path} lacks the inputs {sorted(missing)}; it is not a serving graph")

    # Inputs: input_ids, attention_mask, then the caches, in genai's order. The derived inputs become
    # tensors computed by the new nodes, under the same names, so the original nodes need no change.
    inputs = {i.name: i for i in graph.input}
    mask = helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence_length"])
    kept = [inputs[contract.INPUT_IDS], mask] + [i for i in graph.input if i.name.startswith("past_key_values.")]
    del graph.input[:]
    graph.input.extend(kept)

    # Output: logits [B, V] -> [B, S, V], the layout genai reads.
    last_logits = _PREFIX + "last_logits"
    for node in graph.node:
        node.output[:] = [last_logits if name == contract.LOGITS else name for name in node.output]
    for output in graph.output:
        if output.name == contract.LOGITS:
            output.CopyFrom(helper.make_tensor_value_info(
                contract.LOGITS, TensorProto.FLOAT, ["batch", "sequence_length", card.vocab_size]))

    nodes = _input_nodes() + list(graph.node) + _logits_nodes(last_logits)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(_constants(card))
    return model


def _constants(card: ModelCard) -> list[TensorProto]:
    def const(name, value):
        return numpy_helper.from_array(np.array(value, dtype=np.int64), _PREFIX + name)

    return [const("zero", 0), const("one", 1), const("axis_0", [0]), const("axis_1", [1]), const("ones_1d", [1]),
            const("last_position", card.max_positions - 1)]


class _Nodes:
    """Appends nodes named after their single output, prefixed so they never clash with the exporter's."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        name = output if output in _PUBLIC else _PREFIX + output
        self.nodes.append(helper.make_node(op, [_ref(i) for i in inputs], [name], name=name, **attrs))
        return name


_PUBLIC = {contract.SEQLENS_K, contract.TOTAL_SEQUENCE_LENGTH, contract.QUERY_SEQLENS, contract.POSITION_IDS,
           contract.LOGITS, contract.INPUT_IDS, ATTENTION_MASK}


def _ref(name: str) -> str:
    """Graph inputs and the serving graph's names as they are; wrapper tensors and constants prefixed."""
    return name if name in _PUBLIC or name.startswith(_PREFIX) else _PREFIX + name


def _input_nodes() -> list[onnx.NodeProto]:
    n = _Nodes()
    i32 = TensorProto.INT32

    # kv_len[b] = tokens in row b's cache after this call = the sum of its mask row.
    kv_len = n("ReduceSum", [ATTENTION_MASK, "axis_1"], "kv_len", keepdims=0)
    # onnxruntime rejects -1, which only an all-padding row would give.
    n("Cast", [n("Max", [n("Sub", [kv_len, "one"], "kv_len_minus_1"), "zero"], "seqlens_k_64")],
      contract.SEQLENS_K, to=i32)

    # The mask's width T: genai never makes it wider than the KV buffer.
    width = n("Gather", [n("Shape", [ATTENTION_MASK], "mask_shape"), "one"], "mask_width", axis=0)
    n("Cast", [width], contract.TOTAL_SEQUENCE_LENGTH, to=i32)

    # new[b] = the row's new tokens. In a first prefill (T == S) they are all its tokens (rows are
    # right-padded); after that genai gives every row S new tokens (one a step when generating).
    chunk = n("Gather", [n("Shape", [contract.INPUT_IDS], "ids_shape"), "one"], "chunk", axis=0)
    new = n("Where", [n("Equal", [width, chunk], "first_prefill"), kv_len, chunk], "new")
    n("Cast", [new], contract.QUERY_SEQLENS, to=i32)

    # position_ids[b, j] = past[b] + j, the positions GroupQueryAttention gives the new tokens
    # (padding positions are clamped into the embedding table; their outputs are never read).
    past = n("Unsqueeze", [n("Sub", [kv_len, new], "past"), "axis_1"], "past_column")
    steps = n("Unsqueeze", [n("Range", ["zero", chunk, "one"], "steps"), "axis_0"], "steps_row")
    n("Min", [n("Add", [past, steps], "positions"), "last_position"], contract.POSITION_IDS)
    return n.nodes


def _logits_nodes(last_logits: str) -> list[onnx.NodeProto]:
    """[B, V] -> [B, S, V], the same row at every position."""
    n = _Nodes()
    chunk_1d = n("Shape", [contract.INPUT_IDS], "chunk_1d", start=1, end=2)  # [S]
    shape = n("Concat", ["ones_1d", chunk_1d, "ones_1d"], "logits_expand_shape", axis=0)  # [1, S, 1]
    n("Expand", [n("Unsqueeze", [last_logits, "axis_1"], "last_logits_3d"), shape], contract.LOGITS)
    return n.nodes


# --- genai_config.json -------------------------------------------------------------------------


def genai_config(card: ModelCard) -> dict:
    eos = card.eos_token_ids
    bos = card.special_tokens.get("bos_token_id")
    pad = card.special_tokens.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0  # what genai's model builder does
    model = {
        "type": "llama",  # any decoder-only type; the graph, not the type, decides the computation
        "context_length": card.max_positions,
        "vocab_size": card.vocab_size,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad,
        "decoder": {
            "filename": GENAI_MODEL_FILE,
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "head_size": card.head_dim,
            "hidden_size": card.model.get("d_model", card.n_heads * card.head_dim),
            "num_attention_heads": card.n_heads,
            "num_key_value_heads": card.n_kv_heads,
            "num_hidden_layers": card.n_layers,
            "inputs": {
                "input_ids": contract.INPUT_IDS,
                "attention_mask": ATTENTION_MASK,
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": contract.LOGITS,
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
        },
    }
    if bos is not None:
        model["bos_token_id"] = bos
    search = {
        "do_sample": False,  # greedy unless a caller asks otherwise
        "num_beams": 1,
        "num_return_sequences": 1,
        "max_length": min(card.max_positions, DEFAULT_MAX_LENGTH),
        "min_length": 0,
        "past_present_share_buffer": True,
        "early_stopping": True,
        "length_penalty": 1.0,
        "diversity_penalty": 0.0,
        "no_repeat_ngram_size": 0,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
    }
    return {"model": model, "search": search}


# --- tokenizer_config.json ---------------------------------------------------------------------


def tokenizer_config(card: ModelCard, tokenizer_json: dict) -> dict:
    """What genai's tokenizer (onnxruntime-extensions) reads beside tokenizer.json.

    It tokenizes with tokenizer.json itself; tokenizer_class picks its pre- and post-processing
    family (byte-level BPE as in GPT-2 and SmolLM2, or SentencePiece-style BPE as in Llama 2),
    and the special tokens are looked up by their text.
    """
    added = {t["id"]: t["content"] for t in tokenizer_json.get("added_tokens", [])}
    config = {
        "tokenizer_class": "LlamaTokenizer" if _sentencepiece_style(tokenizer_json) else "GPT2Tokenizer",
        "model_max_length": card.max_positions,
        # As our server encodes a plain prompt: with whatever tokenizer.json's post-processor adds.
        "add_bos_token": _post_processor_adds_bos(tokenizer_json),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    for role in ("bos", "eos", "pad"):
        token_id = card.special_tokens.get(f"{role}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id in added:
            config[f"{role}_token"] = added[token_id]
    if card.chat_template:
        config["chat_template"] = card.chat_template
    return config


def _sentencepiece_style(tokenizer_json: dict) -> bool:
    """Metaspace ("▁" for spaces) or byte fallback: a SentencePiece vocabulary converted to tokenizers."""
    text = json.dumps({k: tokenizer_json.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")})
    return '"Metaspace"' in text or bool((tokenizer_json.get("model") or {}).get("byte_fallback"))


def _post_processor_adds_bos(tokenizer_json: dict) -> bool:
    """Does tokenizer.json's TemplateProcessing put a special token before the text (Llama's <s>)?"""
    processor = tokenizer_json.get("post_processor") or {}
    for p in processor.get("processors", [processor]):
        single = p.get("single") or []
        if p.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
            return True
    return False
