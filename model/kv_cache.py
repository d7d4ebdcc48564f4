"""A preallocated KV cache in PyTorch, with the semantics of the serving graph.

Each layer owns one keys buffer and one values buffer of shape
(slots, Hkv, capacity, hd). A call carries, per row, `query_seqlens` new
tokens (0 = the row is idle) on top of the tokens the row already holds; the
new keys and values are written at the row's own offset and every new token
attends to everything before it. This is exactly what onnxruntime's
GroupQueryAttention does on shared past/present buffers, so the same function
is the PyTorch reference for the exported graph and the eager body of the
custom op the exporter maps to it (export/serving.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from model.config import ModelConfig
from model.transformer import Transformer, apply_rotary, repeat_kv, scaled_dot_product_attention


def cached_attention(q, k, v, past_key, past_value, seqlens_k, query_seqlens, rotary=None):
    """One attention call over a shared cache with ragged rows.

    q (B, T, H, hd), k and v (B, T, Hkv, hd), before rotary embedding;
    past_key/past_value (B, Hkv, M, hd); seqlens_k (B,) = tokens in the row
    after this call minus one; query_seqlens (B,) = valid new tokens per row;
    rotary = (cos_table, sin_table) or None.
    Returns y (B, T, H, hd) and the updated (present) key and value buffers.
    """
    B, T, H, _ = q.shape
    capacity = past_key.size(2)
    seqlens_k, query_seqlens = seqlens_k.long(), query_seqlens.long()
    past_len = seqlens_k + 1 - query_seqlens  # (B,) tokens already cached
    positions = past_len[:, None] + torch.arange(T, device=q.device)[None, :]  # (B, T)
    positions = positions.clamp(max=capacity - 1)  # padding tokens past the end are never read
    if rotary is not None:
        q = apply_rotary(q, rotary[0], rotary[1], positions)
        k = apply_rotary(k, rotary[0], rotary[1], positions)
    present_key, present_value = past_key.clone(), past_value.clone()
    valid = torch.arange(T, device=q.device)[None, :] < query_seqlens[:, None]  # (B, T)
    rows, cols = valid.nonzero(as_tuple=True)
    present_key[rows, :, positions[rows, cols], :] = k[rows, cols]  # (N, Hkv, hd)
    present_value[rows, :, positions[rows, cols], :] = v[rows, cols]
    # Token t of row b sees cache entries 0..positions[b, t].
    mask = torch.arange(capacity, device=q.device)[None, None, :] <= positions[:, :, None]  # (B, T, M)
    n_rep = H // past_key.size(1)
    y = scaled_dot_product_attention(
        q.transpose(1, 2), repeat_kv(present_key, n_rep), repeat_kv(present_value, n_rep), mask[:, None]
    )  # (B, H, T, hd)
    return y.transpose(1, 2), present_key, present_value


def gather_last(hidden: torch.Tensor, query_seqlens: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, D) -> (B, D) at each row's last valid token (row 0's first for idle rows)."""
    last = (query_seqlens.long() - 1).clamp(min=0)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


class KVCache:
    """gpt-fast style cache for the PyTorch model: `step()` runs one ragged call."""

    def __init__(self, config: ModelConfig, slots: int, capacity: int, dtype=torch.float32):
        shape = (slots, config.n_kv_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long)  # tokens held per slot
        self.capacity = capacity
        self._call: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    @torch.no_grad()
    def step(self, model: Transformer, input_ids: torch.Tensor, query_seqlens: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) right-padded, query_seqlens (B,) -> logits (B, V) of each row's last new token."""
        T = input_ids.size(1)
        if int((self.lengths + query_seqlens).max()) > self.capacity:
            raise ValueError(f"a row would exceed the cache capacity of {self.capacity} tokens")
        positions = (self.lengths[:, None] + torch.arange(T)[None, :]).clamp(max=model.config.max_positions - 1)
        self._call = (self.lengths + query_seqlens - 1, query_seqlens)
        hidden = model.hidden_states(input_ids, positions, attend=self._attend)
        self.lengths = self.lengths + query_seqlens
        return model.head(gather_last(hidden, query_seqlens))

    def _attend(self, layer, q, k, v, rope):
        seqlens_k, query_seqlens = self._call
        rotary = (rope.cos, rope.sin) if rope is not None else None
        y, self.keys[layer], self.values[layer] = cached_attention(
            q, k, v, self.keys[layer], self.values[layer], seqlens_k, query_seqlens, rotary
        )
        return y
