"""Maps attnserve::group_query_attention to onnxruntime's com.microsoft.GroupQueryAttention.

onnx ships no schema for com.microsoft ops, so the op is declared here with a
hand-made OpSchema listing the inputs onnxruntime 1.32 defines, in order
(`contract.GQA_INPUTS`). Unused optional inputs are passed as None (empty
names in the node), which puts `query_seqlens` at `contract.QUERY_SEQLENS_INDEX`,
where onnxruntime expects it.
"""
from __future__ import annotations

import onnxscript
from onnx.defs import OpSchema

from server import contract

MSFT = onnxscript.values.Opset("com.microsoft", 1)

_REQUIRED = {"query", "seqlens_k", "total_sequence_length"}
_INT32_INPUTS = {"seqlens_k", "total_sequence_length", "query_seqlens"}
_INT64_INPUTS = {"position_ids"}


def _schema() -> OpSchema:
    def param(name: str) -> OpSchema.FormalParameter:
        type_str = "M" if name in _INT32_INPUTS else ("P" if name in _INT64_INPUTS else "T")
        option = OpSchema.FormalParameterOption.Single if name in _REQUIRED else OpSchema.FormalParameterOption.Optional
        return OpSchema.FormalParameter(name, type_str, param_option=option)

    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param(n) for n in contract.GQA_INPUTS],
        outputs=[OpSchema.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], "activations and cache"),
            ("M", ["tensor(int32)"], "lengths"),
            ("P", ["tensor(int64)"], "positions"),
        ],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
            OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
            OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, "apply rotary embedding inside the op"),
            OpSchema.Attribute("rotary_interleaved", OpSchema.AttrType.INT, "0 = rotate-half layout"),
        ],
    )


GROUP_QUERY_ATTENTION = onnxscript.values.Op(MSFT, "GroupQueryAttention", _schema())


def group_query_attention(
    query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
    query_seqlens, num_heads: int, kv_num_heads: int,
):
    given = dict(query=query, key=key, value=value, past_key=past_key, past_value=past_value,
                 seqlens_k=seqlens_k, total_sequence_length=total_sequence_length,
                 cos_cache=cos_cache, sin_cache=sin_cache, query_seqlens=query_seqlens)
    # Positional, in the op's order; every input not given is skipped (None).
    return GROUP_QUERY_ATTENTION(
        *(given.get(name) for name in contract.GQA_INPUTS),
        num_heads=num_heads, kv_num_heads=kv_num_heads,
        do_rotary=int(cos_cache is not None), rotary_interleaved=0,
        _outputs=3,
    )
