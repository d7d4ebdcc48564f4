"""One config dataclass for every model attnserve trains, imports or serves.

The seed-style transformer ("Attention Is All You Need": sinusoidal positions
added to the embeddings, LayerNorm, GELU MLP, as many KV heads as query heads)
and the Llama family (RoPE, RMSNorm, SwiGLU, grouped-query heads) are the same
definition with different fields. So are the two models that are not decoders:
a BERT-style sentence encoder (bidirectional attention, post-norm, token types,
a pooled embedding) and a Vision Transformer (image patches as tokens, a CLS
token, a classifier head).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

POSITIONAL = ("sinusoidal", "learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
NORM_POSITIONS = ("pre", "post")
HEADS = ("lm", "embedding", "classifier")
POOLINGS = ("", "mean", "cls")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_positions: int  # longest sequence the model (and its serving cache) supports
    n_kv_heads: int = 0  # 0 = same as n_heads (plain multi-head attention)
    positional: str = "sinusoidal"  # added to embeddings, or rotary inside attention
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    bias: bool = True  # biases on projections (the seed model has them, Llama does not)
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    train_seq_len: int = 256  # context length used when training from scratch
    # Encoders and vision. At these defaults the model is the decoder above, and a saved config
    # leaves them out (to_dict), so decoder configs, checkpoints and cards read as they always did.
    causal: bool = True  # False: every token sees every valid token (padding keys are masked out)
    norm_position: str = "pre"  # pre: x + f(norm(x)); post (BERT): norm(x + f(x)), and no final norm
    embedding_norm: bool = False  # a norm over the summed embeddings (BERT's embeddings.LayerNorm)
    type_vocab_size: int = 0  # token-type (segment) embeddings added to the input when > 0
    head: str = "lm"  # lm: logits over the vocabulary; embedding: one pooled vector; classifier: n_labels logits
    pooling: str = ""  # embedding head: "mean" over valid tokens or "cls" (the first token)
    normalize_embeddings: bool = False  # embedding head: scale the pooled vector to unit L2 norm
    n_labels: int = 0  # classifier head: logits per input
    image_size: int = 0  # vision: square images of image_size x image_size pixels
    patch_size: int = 0  # vision: > 0 turns images into (image_size / patch_size)^2 patch tokens
    channels: int = 0  # vision: 1 (grayscale) or 3 (RGB)

    def __post_init__(self):
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        problems = []
        if self.positional not in POSITIONAL:
            problems.append(f"positional must be one of {POSITIONAL}, got {self.positional!r}")
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp not in MLPS:
            problems.append(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.positional == "rope" and self.head_dim % 2:
            problems.append(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_positions"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        problems += self._head_problems() + self._vision_problems()
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def _head_problems(self) -> list[str]:
        problems = []
        if self.norm_position not in NORM_POSITIONS:
            problems.append(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if self.head not in HEADS:
            problems.append(f"head must be one of {HEADS}, got {self.head!r}")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.head == "lm" and not self.causal:
            problems.append("an lm head generates left to right: it needs causal attention")
        if (self.head == "embedding") != bool(self.pooling):
            problems.append(f"pooling {self.pooling!r} does not fit head {self.head!r}: "
                            "the embedding head pools, no other head does")
        if self.normalize_embeddings and self.head != "embedding":
            problems.append("normalize_embeddings needs the embedding head")
        if (self.head == "classifier") != (self.n_labels > 0):
            problems.append(f"n_labels {self.n_labels} does not fit head {self.head!r}: "
                            "a classifier needs n_labels > 0, other heads 0")
        if self.type_vocab_size < 0:
            problems.append(f"type_vocab_size must be 0 or more, got {self.type_vocab_size}")
        return problems

    def _vision_problems(self) -> list[str]:
        if self.patch_size == 0:
            problems = [] if self.vocab_size > 0 else [f"vocab_size must be positive, got {self.vocab_size}"]
            if self.image_size or self.channels:
                problems.append("image_size and channels need patch_size > 0")
            return problems
        problems = []
        if self.patch_size < 0 or self.image_size <= 0 or self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} must be a positive multiple of patch_size {self.patch_size}")
        if self.channels <= 0:
            problems.append(f"channels must be positive for images, got {self.channels}")
        if self.vocab_size or self.type_vocab_size:
            problems.append("an image model has no token vocabulary: vocab_size and type_vocab_size must be 0")
        if self.head != "classifier":
            problems.append(f"an image model needs the classifier head, got {self.head!r}")
        if self.positional != "learned":
            problems.append(f"an image model has learned positions, got {self.positional!r}")
        elif self.patch_size > 0 and self.image_size > 0 and self.max_positions != self.n_patches + 1:
            problems.append(f"max_positions must be {self.n_patches + 1} (the patches and the CLS token), "
                            f"got {self.max_positions}")
        return problems

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.patch_size else 0

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in ENCODER_AND_VISION_FIELDS:
            if data[name] == _DEFAULTS[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {unknown}")
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# The fields added with encoders and vision, left out of a saved config at their defaults.
ENCODER_AND_VISION_FIELDS = (
    "causal", "norm_position", "embedding_norm", "type_vocab_size", "head", "pooling",
    "normalize_embeddings", "n_labels", "image_size", "patch_size", "channels",
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}

# What a BERT-style encoder sets; the presets and the importer add the sizes.
BERT_FIELDS = dict(
    positional="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False, causal=False,
    norm_position="post", embedding_norm=True, head="embedding",
)

PRESETS: dict[str, ModelConfig] = {
    # Trains in seconds; the test suite's model. Seed-style.
    "test": ModelConfig(
        name="test", vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256,
        max_positions=1024, train_seq_len=128,
    ),
    # The Llama-family code path at test size: RoPE, RMSNorm, SwiGLU, 2 query heads per KV head.
    "test-llama": ModelConfig(
        name="test-llama", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        d_ff=192, max_positions=1024, positional="rope", norm="rmsnorm", norm_eps=1e-5,
        mlp="swiglu", bias=False, train_seq_len=128,
    ),
    # The default from-scratch model: trains on 2 CPU cores in under 15 minutes. Sized for
    # throughput (measured, bf16 autocast: about 6,000 tokens/s against 2,900 for d384 x 6 layers),
    # since 13 minutes of training sees only a few million tokens.
    "small": ModelConfig(
        name="small", vocab_size=8192, d_model=256, n_layers=4, n_heads=4, d_ff=1024,
        max_positions=2048, train_seq_len=256,
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture).
    "smollm2-135m-instruct": ModelConfig(
        name="smollm2-135m-instruct", vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
        n_kv_heads=3, d_ff=1536, max_positions=8192, positional="rope", rope_theta=100000.0,
        norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", bias=False, tie_embeddings=True,
        train_seq_len=2048,
    ),
    # A BERT-style sentence encoder at test size, over the small WordPiece vocabulary that
    # export/sentences.py builds (tiny_wordpiece_tokenizer: 274 tokens, rounded up to a multiple of 32).
    "test-encoder": ModelConfig(
        name="test-encoder", vocab_size=288, d_model=64, n_layers=2, n_heads=4, d_ff=128,
        max_positions=128, type_vocab_size=2, pooling="mean", normalize_embeddings=True, norm_eps=1e-12,
        **BERT_FIELDS,
    ),
    # sentence-transformers/all-MiniLM-L6-v2 (BERT architecture): mean-pooled, normalized 384-d embeddings.
    "all-minilm-l6-v2": ModelConfig(
        name="all-minilm-l6-v2", vocab_size=30522, d_model=384, n_layers=6, n_heads=12, d_ff=1536,
        max_positions=512, type_vocab_size=2, pooling="mean", normalize_embeddings=True, norm_eps=1e-12,
        **BERT_FIELDS,
    ),
    # A Vision Transformer for scikit-learn's 8x8 handwritten digits (model/digits.py trains it):
    # 2x2 patches make 16 tokens plus CLS; pre-norm blocks, a final norm, a linear classifier on CLS.
    "vit-digits": ModelConfig(
        name="vit-digits", vocab_size=0, d_model=64, n_layers=4, n_heads=4, d_ff=128, max_positions=17,
        positional="learned", norm="layernorm", mlp="gelu", tie_embeddings=False, causal=False,
        head="classifier", n_labels=10, image_size=8, patch_size=2, channels=1,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
