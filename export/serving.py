"""The serving graph as a PyTorch module, and its attention as one custom op.

    input_ids, position_ids ──► embed ──► block 0 ... block N-1 ──► gather last valid token ──► head ──► logits (float32)
                                             │
                          attnserve::group_query_attention(q, k, v, past_k, past_v, seqlens_k, ...)
                                             │  (the exporter maps it to com.microsoft.GroupQueryAttention)
                                             └──► present_k, present_v  (same buffers as past_k, past_v in onnxruntime)

The model definition stays the single source of truth: ServingGraph only
hands model.hidden_states() an `attend` function that routes each layer's
attention through the custom op. The op's eager body is model.kv_cache's
cached_attention, the PyTorch reference of the cache semantics.

The logits leave the graph as float32 whatever the model's dtype, so the
server samples the same way from an fp16 graph as from an fp32 one.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor

from model.kv_cache import cached_attention, gather_last
from model.transformer import RMSNorm, Transformer


@torch.library.custom_op("attnserve::group_query_attention", mutates_args=())
def group_query_attention(
    query: Tensor,  # (B, S, H*hd)
    key: Tensor,  # (B, S, Hkv*hd)
    value: Tensor,  # (B, S, Hkv*hd)
    past_key: Tensor,  # (B, Hkv, M, hd)
    past_value: Tensor,
    seqlens_k: Tensor,  # int32 (B,)
    total_sequence_length: Tensor,  # int32 ()
    cos_cache: Optional[Tensor],  # (P, hd/2) when rotary
    sin_cache: Optional[Tensor],
    query_seqlens: Tensor,  # int32 (B,)
    num_heads: int,
    kv_num_heads: int,
) -> tuple[Tensor, Tensor, Tensor]:
    B, S, _ = query.shape
    hd = past_key.size(-1)
    rotary = (cos_cache, sin_cache) if cos_cache is not None else None
    y, present_key, present_value = cached_attention(
        query.view(B, S, num_heads, hd),
        key.view(B, S, kv_num_heads, hd),
        value.view(B, S, kv_num_heads, hd),
        past_key, past_value, seqlens_k, query_seqlens, rotary,
    )
    return y.reshape(B, S, num_heads * hd), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
      query_seqlens, num_heads, kv_num_heads):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


class ServingGraph(torch.nn.Module):
    """forward(input_ids, position_ids, seqlens_k, total_sequence_length, query_seqlens, *past) -> (logits, *present)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, position_ids, seqlens_k, total_sequence_length, query_seqlens, *past):
        presents: list[Tensor] = []
        rope = self.model.rope

        def attend(layer, q, k, v, _rope):
            B, S = q.shape[:2]
            y, present_key, present_value = group_query_attention(
                q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1),
                past[2 * layer], past[2 * layer + 1], seqlens_k, total_sequence_length,
                rope.cos if rope is not None else None, rope.sin if rope is not None else None,
                query_seqlens, self.config.n_heads, self.config.n_kv_heads,
            )
            presents.extend([present_key, present_value])
            return y.view(q.shape)

        hidden = self.model.hidden_states(input_ids, position_ids, attend=attend)  # (B, S, D)
        logits = self.model.head(gather_last(hidden, query_seqlens))  # (B, V): only the rows' last tokens
        return (logits.float(), *presents)


class Float32StatsRMSNorm(torch.nn.Module):
    """RMSNorm of an fp16 tensor with its mean of squares in fp32, as Hugging Face's LlamaRMSNorm does.

    In fp16, x² overflows above |x| = 256, and residual streams of pretrained
    models carry larger values. The weight stays fp16 and multiplies the fp16
    result, so onnxruntime's fusion still sees its SimplifiedLayerNormalization
    pattern. (LayerNorm needs no wrapper: ONNX LayerNormalization keeps its
    statistics in fp32 by default, stash_type = 1.)
    """

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def half_precision(model: Transformer) -> Transformer:
    """An fp16 copy of model for export (weights, buffers, activations; RMSNorm statistics in fp32)."""
    half = copy.deepcopy(model).half().eval()
    for parent in list(half.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RMSNorm):
                setattr(parent, name, Float32StatsRMSNorm(child))
    return half
