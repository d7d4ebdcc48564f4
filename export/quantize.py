"""Block-quantized weights in the serving graph: MatMulNBits for every projection, the LM head
included, and GatherBlockQuantized for the token embedding.

A BlockWeight is a [N, K] weight (PyTorch's (out_features, in_features)) quantized in
blocks of BLOCK along K:

    w[n, k] = scales[n, b] * (q[n, k] - zero_point) + offsets[n, b]      b = k // BLOCK

It comes either from a GGUF file's own blocks (export/gguf_blocks.py) or from float
weights by round-to-nearest (rtn, below). quantize_graph rewrites the exported fp32
graph in place of its MatMul and Gather weights:

    x ─► MatMul(x, W^T) ─► y            becomes   x ─► MatMulNBits(x, q, scales[, zero_points]) ─► y
    x ─► MatMul(x, Transpose(E)) ─► y   (tied LM head) becomes the same, with the head's own q
    Gather(E, input_ids)                becomes   GatherBlockQuantized(q, input_ids, scales), 8 bits

Weights with block offsets (GGUF Q4_1) keep them exact without float zero points, which
send MatMulNBits down a slow path (25 times slower measured on one 576x1536 layer):

    x ─┬─ MatMulNBits(x, q, d, zero points 0) ─────────────────────┐
       └─ MatMul(x, S) = block sums [.., K/32] ─ MatMul(·, offsets^T) ─ Add ─► y

where S [K, K/32] is 1 where row k lies in block b: y = Σ d·q·x + Σ_b m_b Σ_{k∈b} x_k.
Inputs shared by several projections (q, k, v; gate, up) compute their block sums once.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export import graph_passes

BLOCK = 32
ACCURACY_LEVELS = (0, 4)  # 0: fp32 arithmetic on dequantized weights; 4: int8 activations (faster, less exact)
SCHEMES = ("fp32", "int8", "int4")
SCHEME_BITS = {"int8": 8, "int4": 4}
EMBEDDING = "tok_emb.weight"
LM_HEAD = "lm_head.weight"
MS_DOMAIN = "com.microsoft"
_PREFIX = "quantized/"


@dataclass
class BlockWeight:
    q: np.ndarray  # uint8 [N, K]: unsigned codes in [0, 2**bits)
    scales: np.ndarray  # float32 [N, K / BLOCK]
    bits: int
    zero_point: int  # the code of 0 (2**(bits-1) when symmetric; 0 with offsets)
    offsets: Optional[np.ndarray] = None  # float32 [N, K / BLOCK]: block minimums (GGUF Q4_1)

    @property
    def symmetric(self) -> bool:
        return self.offsets is None and self.zero_point == 2 ** (self.bits - 1)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], in the order of operations gguf's own dequantization uses (so equal bit for bit)."""
        rows, cols = self.q.shape
        codes = self.q.reshape(rows, cols // BLOCK, BLOCK).astype(np.float32) - np.float32(self.zero_point)
        values = self.scales[:, :, None] * codes
        if self.offsets is not None:
            values = values + self.offsets[:, :, None]
        return values.reshape(rows, cols)

    def take_rows(self, order: np.ndarray) -> "BlockWeight":
        return dataclasses.replace(self, q=self.q[order], scales=self.scales[order],
                                   offsets=None if self.offsets is None else self.offsets[order])

    @property
    def nbytes(self) -> int:
        """Bytes as stored in the graph: packed codes, fp32 scales, offsets and packed zero points."""
        rows, cols = self.q.shape
        blocks = rows * cols // BLOCK
        offsets = blocks * 4 if self.offsets is not None else 0
        zero_points = 0 if self.zero_point == 2 ** (self.bits - 1) else rows * -(-(cols // BLOCK) * self.bits // 8)
        return rows * cols * self.bits // 8 + blocks * 4 + offsets + zero_points


def rtn(weight: np.ndarray, bits: int) -> BlockWeight:
    """Round-to-nearest, symmetric, per block: the value of largest magnitude maps to the lowest code.

    As ggml's Q4_0 does, the scale is peak / -2**(bits-1), so the peak lands exactly on code 0 and
    the 2**bits codes are all used (a scale of max|w| / (2**(bits-1) - 1) would waste one).
    """
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"rows of {cols} weights are not a multiple of the block size {BLOCK}")
    blocks = np.asarray(weight, np.float32).reshape(rows, cols // BLOCK, BLOCK)  # (N, nb, 32)
    peak_at = np.abs(blocks).argmax(-1)[..., None]
    peak = np.take_along_axis(blocks, peak_at, -1)[..., 0]  # (N, nb), signed
    half = 2 ** (bits - 1)
    scales = (peak / -half).astype(np.float32)
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
    codes = np.clip(np.round(blocks * inverse[..., None]) + half, 0, 2 * half - 1).astype(np.uint8)
    return BlockWeight(codes.reshape(rows, cols), scales, bits=bits, zero_point=half)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., n] codes -> MatMulNBits' packing: for 4 bits, element 2i in the low nibble of byte i."""
    if bits == 8:
        return codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    pairs = codes.reshape(codes.shape[:-1] + (-1, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def matmul_nbits_inputs(weight: BlockWeight) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(B uint8 [N, nb, blob], scales [N, nb], zero points uint8 [N, ceil(nb*bits/8)] or None for the default)."""
    rows, cols = weight.q.shape
    blocks = cols // BLOCK
    packed = pack_codes(weight.q.reshape(rows, blocks, BLOCK), weight.bits)
    zero_points = None
    if weight.zero_point != 2 ** (weight.bits - 1):
        zero_points = pack_codes(np.full((rows, blocks), weight.zero_point, np.uint8), weight.bits)
    return packed, weight.scales.astype(np.float32), zero_points


def fingerprint(values: np.ndarray) -> tuple:
    values = np.ascontiguousarray(values, np.float32)
    return values.shape, hashlib.blake2b(values.tobytes(), digest_size=16).hexdigest()


class _Graph:
    """The graph being rewritten: initializers by name, consumers, and new nodes' unique names."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.added: list[onnx.TensorProto] = []

    def constant(self, name: str, values: np.ndarray) -> str:
        name = _PREFIX + name
        if name not in self.initializers:
            tensor = numpy_helper.from_array(values, name)
            self.initializers[name] = tensor
            self.added.append(tensor)
        return name


def quantize_graph(model: onnx.ModelProto, params: dict[str, np.ndarray], weights: dict[str, BlockWeight],
                   accuracy_level: int) -> dict[str, int]:
    """Rewrite model (loaded with its weights) in place; returns the count of each rewritten kind.

    params: our parameter name -> the float32 [N, K] values the graph was exported with, to find
    each parameter's initializer (the exporter names them val_17 and the like). weights: parameter
    name -> its BlockWeight; EMBEDDING is gathered, LM_HEAD (or a tied head: the embedding's
    transpose) multiplied. A parameter without a BlockWeight stays float.
    """
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    g = _Graph(model)
    by_fingerprint = {}
    for name, values in params.items():
        by_fingerprint[("W^T",) + fingerprint(values.T)] = name
        by_fingerprint[("W",) + fingerprint(values)] = name

    def param_of(tensor_name: str, layout: str) -> Optional[str]:
        init = g.initializers.get(tensor_name)
        if init is None or len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
            return None
        return by_fingerprint.get((layout,) + fingerprint(numpy_helper.to_array(init)))

    transposed = {}  # Transpose output -> parameter whose [N, K] initializer it transposes
    for node in g.graph.node:
        perm = [helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"]
        if node.op_type == "Transpose" and perm in ([[1, 0]], []):
            name = param_of(node.input[0], "W")
            if name is not None:
                transposed[node.output[0]] = name

    counts = {"MatMulNBits": 0, "GatherBlockQuantized": 0, "block_offsets": 0}
    block_sums: dict[str, str] = {}
    new_nodes = []
    for node in g.graph.node:
        if node.op_type == "Gather" and node.domain == "" and EMBEDDING in weights \
                and param_of(node.input[0], "W") == EMBEDDING:
            new_nodes.append(_gather(g, node, weights[EMBEDDING]))
            counts["GatherBlockQuantized"] += 1
            continue
        if node.op_type == "MatMul" and node.domain == "":
            name = transposed.get(node.input[1]) or param_of(node.input[1], "W^T")
            if name == EMBEDDING:
                name = LM_HEAD  # a tied head multiplies by the embedding; it gets blocks of its own
            if name is not None and name in weights:
                nodes = _matmul(g, node, name, weights[name], accuracy_level, block_sums)
                new_nodes.extend(nodes)
                counts["MatMulNBits"] += 1
                counts["block_offsets"] += weights[name].offsets is not None
                continue
        new_nodes.append(node)
    del g.graph.node[:]
    g.graph.node.extend(new_nodes)
    g.graph.initializer.extend(g.added)
    graph_passes.remove_dead_nodes(model)  # the tied head's Transpose, the float weights
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def _matmul(g: _Graph, node: onnx.NodeProto, name: str, weight: BlockWeight, accuracy_level: int,
            block_sums: dict[str, str]) -> list[onnx.NodeProto]:
    rows, cols = weight.q.shape  # (N, K)
    packed, scales, zero_points = matmul_nbits_inputs(weight)
    inputs = [node.input[0], g.constant(f"{name}.q{weight.bits}", packed), g.constant(f"{name}.scales", scales)]
    if zero_points is not None:
        inputs.append(g.constant(f"{name}.zero_points", zero_points))
    product = node.output[0] if weight.offsets is None else _PREFIX + f"{name}.scaled_codes"
    nodes = [helper.make_node("MatMulNBits", inputs, [product], name=_PREFIX + name, domain=MS_DOMAIN,
                              K=cols, N=rows, bits=weight.bits, block_size=BLOCK, accuracy_level=accuracy_level)]
    if weight.offsets is None:
        return nodes
    x = node.input[0]
    if x not in block_sums:
        indicator = np.repeat(np.eye(cols // BLOCK, dtype=np.float32), BLOCK, axis=0)  # (K, K/32)
        block_sums[x] = _PREFIX + f"{name}.block_sums"
        nodes.append(helper.make_node("MatMul", [x, g.constant(f"block_indicator_{cols}", indicator)],
                                      [block_sums[x]], name=block_sums[x]))
    correction = _PREFIX + f"{name}.offset_product"
    offsets_t = np.ascontiguousarray(weight.offsets.T, np.float32)  # (K/32, N)
    nodes.append(helper.make_node("MatMul", [block_sums[x], g.constant(f"{name}.offsets", offsets_t)],
                                  [correction], name=correction))
    nodes.append(helper.make_node("Add", [product, correction], [node.output[0]], name=_PREFIX + f"{name}.add"))
    return nodes


def _gather(g: _Graph, node: onnx.NodeProto, weight: BlockWeight) -> onnx.NodeProto:
    if weight.bits != 8 or weight.offsets is not None:
        raise ValueError("the embedding is gathered from 8-bit symmetric blocks")
    inputs = [g.constant(f"{EMBEDDING}.q8", weight.q), node.input[1], g.constant(f"{EMBEDDING}.scales", weight.scales)]
    return helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=_PREFIX + EMBEDDING,
                            domain=MS_DOMAIN, bits=8, block_size=BLOCK, gather_axis=0, quantize_axis=1)


def weight_kind(name: str) -> Optional[str]:
    """The card's tensor kind of a parameter that is quantized, or None for one that stays float."""
    if name == EMBEDDING:
        return "embedding"
    if name == LM_HEAD:
        return "lm_head"
    if name.startswith("blocks.") and name.endswith("_proj.weight"):
        return "attention" if ".attn." in name else "mlp"
    return None


@dataclass
class Planned:
    weight: BlockWeight
    source: str  # "gguf-Q4_1" (the file's blocks), "rtn-from-fp32", "rtn-from-gguf-Q4_1" (its dequantized values)


def plan_weights(scheme: str, state: dict[str, np.ndarray], tied: bool,
                 gguf_blocks: Optional[dict[str, tuple[str, Optional[BlockWeight]]]] = None,
                 q4_1: str = "offsets", head_bits: int = 8) -> dict[str, Planned]:
    """The BlockWeight of every quantized parameter under scheme ("int8" or "int4").

    state: float32 [N, K] values by our parameter name (a GGUF import's are its dequantized blocks).
    gguf_blocks (export/gguf_blocks.py): where the GGUF's own blocks fit the scheme they are taken as
    they are: under int4, Q4_0, Q4_1 and Q8_0 (the file's 8-bit tensors stay 8-bit); under int8, Q8_0.
    Anything else is rounded to nearest from its float values. q4_1 "requantize" rounds Q4_1
    tensors to symmetric 4-bit instead of holding their block offsets. The embedding is 8-bit always
    (a gather reads a few rows a token, so fewer bits would save bytes on disk only). The LM head
    takes the scheme's bits, but at most head_bits: 8 (the default) keeps it 8-bit under int4, as
    the GGUF files of small models do (it is a fifth of SmolLM2's weights and the most sensitive);
    4 rounds it to 4 bits too (faster decode, measured quality in docs/quantization.md).
    """
    if head_bits not in (4, 8):
        raise ValueError(f"head_bits must be 4 or 8, got {head_bits}")
    if scheme not in SCHEME_BITS:
        raise ValueError(f"scheme must be one of {', '.join(SCHEME_BITS)}, got {scheme!r}")
    names = [n for n in state if weight_kind(n) is not None]
    if tied:
        names.append(LM_HEAD)
    planned = {}
    for name in names:
        values = state[EMBEDDING if name == LM_HEAD and tied else name]
        bits = 8 if name == EMBEDDING else SCHEME_BITS[scheme]
        if name == LM_HEAD:
            bits = min(bits, head_bits)
        if values.shape[1] % BLOCK:
            continue  # MatMulNBits could pad, but no model here has such rows; it stays float
        format_name, blocks = (gguf_blocks or {}).get(name, (None, None))
        exact_ok = blocks is not None and (blocks.bits == 8 or (bits == 4 and blocks.bits == 4))
        if exact_ok and name == LM_HEAD and blocks.bits > head_bits:
            exact_ok = False
        if exact_ok and name == EMBEDDING and not blocks.symmetric:
            exact_ok = False
        if exact_ok and blocks.offsets is not None and q4_1 == "requantize":
            exact_ok = False
        if exact_ok:
            planned[name] = Planned(blocks, f"gguf-{format_name}")
        else:
            origin = f"rtn-from-gguf-{format_name}" if format_name else "rtn-from-fp32"
            planned[name] = Planned(rtn(values, bits), origin)
    return planned


def weights_card(scheme: str, planned: dict[str, Planned], accuracy_level: int) -> dict:
    """The card's `weights` entry: per tensor kind, the op, bits, zero point and where the blocks came from."""
    kinds: dict[str, dict] = {}
    for name, p in planned.items():
        kind = weight_kind(name)
        entry = kinds.setdefault(kind, {"op": "GatherBlockQuantized" if kind == "embedding" else "MatMulNBits",
                                        "tensors": 0, "bits": {}, "sources": {}, "symmetric": True,
                                        "block_offsets": False, "zero_points": {}})
        entry["tensors"] += 1
        entry["bits"][str(p.weight.bits)] = entry["bits"].get(str(p.weight.bits), 0) + 1
        entry["sources"][p.source] = entry["sources"].get(p.source, 0) + 1
        entry["symmetric"] = entry["symmetric"] and p.weight.symmetric
        entry["block_offsets"] = entry["block_offsets"] or p.weight.offsets is not None
        zero = str(p.weight.zero_point)
        entry["zero_points"][zero] = entry["zero_points"].get(zero, 0) + 1
    sources = sorted({p.source for p in planned.values()})
    return {
        "scheme": scheme,
        "block_size": BLOCK,
        "accuracy_level": accuracy_level,
        "source": "gguf-blocks" if all(s.startswith("gguf-") for s in sources) else
                  ("rtn-from-fp32" if sources == ["rtn-from-fp32"] else "mixed: " + ", ".join(sources)),
        "kinds": kinds,
        "quantized_bytes": sum(p.weight.nbytes for p in planned.values()),
    }


def write_quantized_graph(model_path, model, scheme: str, accuracy_level: int,
                          gguf_blocks: Optional[dict] = None, q4_1: str = "offsets", head_bits: int = 8):
    """Rewrite the fp32 model.onnx at model_path (+ its .data) with scheme's blocks, in place.

    Returns (reference, weights entry): reference is the PyTorch module with the very weights the
    graph holds, dequantized (untied when the head's blocks differ from the embedding's), which is
    what the graph is verified against; the entry is weights_card's, with the rewrite's node counts.
    """
    import os

    import torch

    from model.transformer import Transformer

    state = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    planned = plan_weights(scheme, state, model.config.tie_embeddings, gguf_blocks, q4_1, head_bits)
    graph = onnx.load(str(model_path))
    params = {name: state[name] for name in planned if name in state}
    counts = quantize_graph(graph, params, {name: p.weight for name, p in planned.items()}, accuracy_level)
    matmuls = sum(1 for name in planned if name != EMBEDDING)
    if counts["MatMulNBits"] != matmuls or counts["GatherBlockQuantized"] != (EMBEDDING in planned):
        raise RuntimeError(f"the graph rewrite replaced {counts}, expected {matmuls} MatMulNBits and "
                           f"{int(EMBEDDING in planned)} GatherBlockQuantized: a weight was not found in the graph")
    counts["MatMulNBits_fused_away"] = graph_passes.fuse_shared_input_matmuls(graph, op="MatMulNBits")
    counts["qkv_packed"] = graph_passes.pack_qkv_into_attention(graph)
    data = f"{os.path.basename(model_path)}.data"
    data_path = os.path.join(os.path.dirname(model_path), data)
    if os.path.exists(data_path):
        os.remove(data_path)  # onnx appends to an existing data file
    onnx.save(graph, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
              size_threshold=1024)
    os.chmod(data_path, 0o644)  # onnx writes it private; servers often run as another user

    config = model.config
    if config.tie_embeddings and LM_HEAD in planned:
        config = dataclasses.replace(config, tie_embeddings=False)
    reference = Transformer(config)
    ref_state = {name: torch.from_numpy(values) for name, values in state.items()}
    for name, p in planned.items():
        ref_state[name] = torch.from_numpy(p.weight.dequantize())
    reference.load_state_dict(ref_state, strict=True)
    entry = weights_card(scheme, planned, accuracy_level)
    entry["graph_nodes"] = counts
    probe_name = next((n for n in planned if n.endswith("mlp.up_proj.weight")), None)
    if probe_name is not None:
        entry["accuracy_level_measured"] = measure_accuracy_levels(probe_name, state[probe_name],
                                                                   planned[probe_name].weight)
    return reference.eval(), entry


def measure_accuracy_levels(name: str, values: np.ndarray, weight: BlockWeight, calls: int = 200) -> dict:
    """One of the model's own projections alone, batch 1, one thread, at each accuracy level: the median
    ms per call and the max |error| relative to the largest |output| against fp32 arithmetic on the same
    dequantized weights. A quick figure for the card (the machine's own, noisy on a shared one)."""
    import time

    import onnxruntime as ort

    rows, cols = values.shape
    x = np.random.default_rng(0).standard_normal((1, cols)).astype(np.float32)
    expected = x @ weight.dequantize().T
    out = {"tensor": name, "bits": weight.bits, "K": cols, "N": rows, "batch": 1, "threads": 1}
    for level in ACCURACY_LEVELS:
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "projection",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, cols])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, rows])],
                                  [numpy_helper.from_array(np.ascontiguousarray(values.T), "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        quantize_graph(model, {name: values}, {name: weight}, level)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            y = session.run(None, {"x": x})[0]
            times.append(time.perf_counter() - started)
        out[f"level_{level}_ms"] = round(float(np.median(times)) * 1e3, 4)
        out[f"level_{level}_max_rel_error"] = float(np.abs(y - expected).max() / np.abs(expected).max())
    return out
