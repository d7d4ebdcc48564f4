"""The transformer, readable top to bottom: a decoder, a sentence encoder or a Vision Transformer.

Built from the parts of "Attention Is All You Need": scaled dot-product
attention, multi-head attention with learned Q/K/V projections, positional
information added to the token embeddings, residual blocks, an MLP and an LM
head tied to the embedding. The config switches on the Llama-family parts:
rotary positions, RMSNorm, SwiGLU and grouped-query heads; and the parts of
the other two shapes, which share every block with the decoder:

    decoder   input_ids ─► embed ─► blocks (causal) ─► final norm ─► LM head       forward()  -> (B, T, V)
    encoder   input_ids, token types ─► embed + norm ─► blocks (padding keys masked,
              post-norm as in BERT) ─► pool over valid tokens ─► L2-normalize       encode()   -> (B, D)
    ViT       pixel_values ─► patches + CLS ─► blocks (all see all) ─► final norm
              ─► linear classifier on CLS                                          classify() -> (B, n_labels)

Shapes: B batch, T tokens in this call, S keys attended to, D d_model,
H query heads, Hkv key/value heads, hd head_dim, V vocabulary.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig

# The serving path hands attention to a cache object (see model/kv_cache.py and
# export/serving.py): attend(layer_index, q, k, v, rope) -> y, with q (B, T, H, hd),
# k and v (B, T, Hkv, hd) before rotary embedding, y (B, T, H, hd).
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, Optional["Rotary"]], torch.Tensor]


def scaled_dot_product_attention(q, k, v, mask):
    """softmax(Q Kᵀ / √d) V. q (B, H, T, hd), k and v (B, H, S, hd), mask (.., T, S) True = may attend, None = all.

    Every row of the mask must allow at least one key, or its softmax is 0/0 (attention_mask() sees to that).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, T, hd)


def attention_mask(T: int, causal: bool, key_padding: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Which keys each query may see: (T, S), (B, 1, T|1, S) or None (all), S = T.

    causal: token t sees tokens 0..t. key_padding (B, S) bool, True = a real token: padding keys are
    hidden from every query. A row with no real token at all (an empty input) sees every key instead,
    so that its softmax stays finite; poolings weigh such a row's tokens by zero anyway.
    """
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril() if causal else None  # (T, S)
    if key_padding is None:
        return mask
    keys = key_padding | ~key_padding.any(dim=-1, keepdim=True)  # (B, S)
    keys = keys[:, None, None, :]  # (B, 1, 1, S)
    return keys if mask is None else keys & mask  # (B, 1, T|1, S)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: each KV head serves n_rep query heads. (B, Hkv, S, hd) -> (B, H, S, hd)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(same), as in the original paper."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table  # (P, D)


class Rotary(nn.Module):
    """Rotary position embedding in the rotate-half layout (Hugging Face Llama)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (P, hd/2)
        # Half-width tables are what GroupQueryAttention's cos_cache/sin_cache take.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, self.cos, self.sin, positions)


def apply_rotary(x, cos_table, sin_table, positions):
    """x (B, T, heads, hd), positions (B, T), tables (P, hd/2) -> x rotated by each token's position."""
    cos = cos_table[positions][:, :, None, :]  # (B, T, 1, hd/2)
    sin = sin_table[positions][:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(...) rather than x * rsqrt(...): exported, this is the pattern onnxruntime fuses into one
        # SimplifiedLayerNormalization kernel (the rsqrt form stays seven separate operators per norm).
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


class MultiHeadAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.causal = config.causal
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x, positions, rope: Optional[Rotary], attend: Optional[AttendFn] = None,
                key_padding: Optional[torch.Tensor] = None):
        """key_padding (B, T) bool, True = a real token; None = every token is real."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if attend is not None:
            y = attend(self.layer_index, q, k, v, rope)  # the cache attends over past and new tokens
        else:
            if rope is not None:
                q, k = rope(q, positions), rope(k, positions)
            mask = attention_mask(T, self.causal, key_padding, x.device)
            n_rep = self.n_heads // self.n_kv_heads
            y = scaled_dot_product_attention(
                q.transpose(1, 2), repeat_kv(k.transpose(1, 2), n_rep), repeat_kv(v.transpose(1, 2), n_rep), mask
            ).transpose(1, 2)  # (B, T, H, hd)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    """Residual block. Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)).
    Post-norm (the original paper, BERT): norm(x + attn(x)), then norm(x + mlp(x))."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.attn_norm = make_norm(config)
        self.attn = MultiHeadAttention(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, positions, rope, attend=None, key_padding=None):
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x, positions, rope, attend, key_padding))
            return self.mlp_norm(x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x), positions, rope, attend, key_padding)
        return x + self.mlp(self.mlp_norm(x))


class PatchEmbedding(nn.Module):
    """The Vision Transformer's front: an image becomes a CLS token followed by one token per patch.

    A Conv2d whose stride equals its kernel is one linear projection of each non-overlapping
    patch_size x patch_size patch, patches taken row by row. Positions are added by the model.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.channels, config.d_model, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.d_model))

    def forward(self, pixel_values):
        patches = self.proj(pixel_values)  # (B, D, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls.expand(patches.size(0), -1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1)  # (B, 1 + N, D)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        if config.patch_size:
            self.patch_emb = PatchEmbedding(config)
        else:
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.type_vocab_size:
            self.type_emb = nn.Embedding(config.type_vocab_size, config.d_model)
        if config.positional == "learned":
            self.pos_emb = nn.Embedding(config.max_positions, config.d_model)
        elif config.positional == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.max_positions, config.d_model), persistent=False)
        self.rope = (
            Rotary(config.head_dim, config.max_positions, config.rope_theta) if config.positional == "rope" else None
        )
        if config.embedding_norm:
            self.emb_norm = make_norm(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        if config.norm_position == "pre":  # post-norm blocks end normalized already
            self.final_norm = make_norm(config)
        if config.head == "lm" and not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.head == "classifier":
            self.classifier = nn.Linear(config.d_model, config.n_labels)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, inputs, positions, token_type_ids=None):
        """Token (or patch) vectors plus positions (and token types), normalized where the config says.

        inputs: input_ids int64 (B, T), or pixel_values (B, C, H, W) for an image model.
        """
        x = self.patch_emb(inputs) if self.config.patch_size else self.tok_emb(inputs)  # (B, T, D)
        if self.config.type_vocab_size:
            x = x + self.type_emb(torch.zeros_like(positions) if token_type_ids is None else token_type_ids)
        if self.config.positional == "learned":
            x = x + self.pos_emb(positions)
        elif self.config.positional == "sinusoidal":
            # As in the paper, the embeddings are multiplied by √d_model: at their 0.02 init scale the
            # unit-amplitude sinusoids would otherwise drown them, and the model learns little beyond
            # token frequencies (measured: stuck at the unigram loss after 150 steps of `small`).
            x = x * math.sqrt(self.config.d_model) + self.pos_table[positions]
        if self.config.embedding_norm:
            x = self.emb_norm(x)
        return x

    def head(self, hidden):
        """Final norm and LM head: (..., D) -> (..., V)."""
        hidden = self.final_norm(hidden)
        weight = self.tok_emb.weight if self.config.tie_embeddings else self.lm_head.weight
        return hidden @ weight.t()

    def hidden_states(self, inputs, positions, attend: Optional[AttendFn] = None,
                      key_padding: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None):
        x = self.embed(inputs, positions, token_type_ids)
        for block in self.blocks:
            x = block(x, positions, self.rope, attend, key_padding)
        return x  # (B, T, D), before the final norm (if the model has one)

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids int64 (B, T), attention_mask (B, T) 1 = token 0 = padding -> embeddings (B, D).

        The embedding head: pooled over the valid tokens, unit length if the config normalizes.
        A row without valid tokens pools to zeros.
        """
        if self.config.head != "embedding":
            raise ValueError(f"encode() needs the embedding head; {self.config.name} has head {self.config.head!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)  # (B, T)
        hidden = self.hidden_states(input_ids, positions, key_padding=attention_mask.bool(),
                                    token_type_ids=token_type_ids)  # (B, T, D)
        if self.config.norm_position == "pre":
            hidden = self.final_norm(hidden)
        pooled = pool(hidden, attention_mask, self.config.pooling)  # (B, D)
        return F.normalize(pooled, p=2.0, dim=-1) if self.config.normalize_embeddings else pooled

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values float (B, C, H, W) -> logits (B, n_labels): a linear classifier on the normed CLS token."""
        if self.config.head != "classifier" or not self.config.patch_size:
            raise ValueError(f"classify() needs an image model with a classifier head; {self.config.name} is not one")
        B = pixel_values.size(0)
        positions = torch.arange(self.config.n_patches + 1, device=pixel_values.device).expand(B, -1)  # (B, 1 + N)
        hidden = self.final_norm(self.hidden_states(pixel_values, positions))  # (B, 1 + N, D)
        return self.classifier(hidden[:, 0])  # (B, n_labels)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids int64 (B, T) -> logits (B, T, V); no cache, causal attention over the T tokens."""
        if self.config.head != "lm":
            raise ValueError(f"forward() is the LM head's; {self.config.name} has head {self.config.head!r}: "
                             "use encode() or classify()")
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        return self.head(self.hidden_states(input_ids, position_ids))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden (B, T, D), attention_mask (B, T) 1 = token -> (B, D): the mean over valid tokens, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.to(hidden.dtype)[:, :, None]  # (B, T, 1)
    count = weights.sum(dim=1).clamp(min=1.0)  # (B, 1): an empty row divides zeros by one
    return (hidden * weights).sum(dim=1) / count  # (B, D)
