"""The decoder-only transformer, readable top to bottom.

Built from the parts of "Attention Is All You Need": scaled dot-product
attention, multi-head attention with learned Q/K/V projections, positional
information added to the token embeddings, residual blocks, an MLP and an LM
head tied to the embedding. The config switches on the Llama-family parts:
rotary positions, RMSNorm, SwiGLU and grouped-query heads.

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
    """softmax(Q Kᵀ / √d) V. q (B, H, T, hd), k and v (B, H, S, hd), mask (.., T, S) True = may attend."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, T, hd)


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
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x, positions, rope: Optional[Rotary], attend: Optional[AttendFn] = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if attend is not None:
            y = attend(self.layer_index, q, k, v, rope)  # the cache attends over past and new tokens
        else:
            if rope is not None:
                q, k = rope(q, positions), rope(k, positions)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            n_rep = self.n_heads // self.n_kv_heads
            y = scaled_dot_product_attention(
                q.transpose(1, 2), repeat_kv(k.transpose(1, 2), n_rep), repeat_kv(v.transpose(1, 2), n_rep), causal
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
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = MultiHeadAttention(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, positions, rope, attend=None):
        x = x + self.attn(self.attn_norm(x), positions, rope, attend)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.positional == "learned":
            self.pos_emb = nn.Embedding(config.max_positions, config.d_model)
        elif config.positional == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.max_positions, config.d_model), persistent=False)
        self.rope = (
            Rotary(config.head_dim, config.max_positions, config.rope_theta) if config.positional == "rope" else None
        )
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, input_ids, positions):
        x = self.tok_emb(input_ids)  # (B, T, D)
        if self.config.positional == "learned":
            x = x + self.pos_emb(positions)
        elif self.config.positional == "sinusoidal":
            # As in the paper, the embeddings are multiplied by √d_model: at their 0.02 init scale the
            # unit-amplitude sinusoids would otherwise drown them, and the model learns little beyond
            # token frequencies (measured: stuck at the unigram loss after 150 steps of `small`).
            x = x * math.sqrt(self.config.d_model) + self.pos_table[positions]
        return x

    def head(self, hidden):
        """Final norm and LM head: (..., D) -> (..., V)."""
        hidden = self.final_norm(hidden)
        weight = self.tok_emb.weight if self.config.tie_embeddings else self.lm_head.weight
        return hidden @ weight.t()

    def hidden_states(self, input_ids, positions, attend: Optional[AttendFn] = None):
        x = self.embed(input_ids, positions)
        for block in self.blocks:
            x = block(x, positions, self.rope, attend)
        return x  # (B, T, D), before the final norm

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids int64 (B, T) -> logits (B, T, V); no cache, causal attention over the T tokens."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        return self.head(self.hidden_states(input_ids, position_ids))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
