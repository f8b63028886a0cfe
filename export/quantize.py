"""Weight-only int4 (or int8) quantization of the decoder's matrix products, one weight at a time.

A decode step streams every weight from memory once per token, so its time is bytes: 4-bit weights in blocks of 128
with one fp32 scale per block are 0.133x the fp32 bytes (blocks of 32, as llama.cpp's Q4_0: 0.156x). Blocks of 128
are the default (`default_block`) because ONNX Runtime's int8 CPU kernel pays per block: they run a 4B-width decode
step 1.35x and a 740-token prefill 1.2x faster than blocks of 32, within the same quality budget (README, "Quantized
weights"). The scales take the weight's float type: fp32, or fp16 in an fp16 export (MatMulNBits and
DequantizeLinear give their output the scales' type, which must be the activations'). What stays float: the vision
encoder (a separate graph), every norm, RoPE, softmax, the DeepStack adds and the KV cache (none of them is a MatMul
on a weight), and the attention products (both operands are activations).

Symmetric blocks: each block's scale is its largest-magnitude value divided by -2^(bits-1), so that value lands
exactly on the code -2^(bits-1) and the others round onto [-2^(bits-1), 2^(bits-1) - 1] (an fp16 weight over a
power of two is an exact fp16 scale unless it underflows; the codes are computed against the scale as stored); no
zero points (a quantizer that writes float zero points sends ONNX Runtime down a slow path). Rounding is numpy's
round-half-even in float32: the same weights give the same bytes.

Two forms of the same numbers:
- `matmulnbits`: com.microsoft MatMulNBits (B packed [N, K/block, block*bits/8], codes stored +2^(bits-1)), with
  accuracy_level 4 (int8 activations), the form ONNX Runtime's CPU and CUDA kernels run fast; MIGraphX parses it
  (4-bit) from ROCm 6.3.
- `dequantizelinear`: standard ONNX, DequantizeLinear(int4 [K, N], blocked along K, opset 21) then MatMul, which
  MIGraphX parses natively and ONNX Runtime's CPU provider fuses back into MatMulNBits
  (`session.qdq_matmulnbits_accuracy_level`, 4 by default).

decoder.onnx and prefill.onnx keep sharing one data file: a weight both graphs read is quantized once.
"""

import ast
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

FORMS = ("matmulnbits", "dequantizelinear")
BLOCKS = (32, 64, 128)  # weights per scale along K; llama.cpp's Q4_0 uses 32
ALIGN = 64  # bytes: every tensor in the data file starts on a cache line
ROWS_PER_PASS = 2048  # output columns quantized at once: bounds the temporaries for a 152k x 2560 LM head
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    block_size: int = 128
    accuracy_level: int = 4  # int8 activations: the fast CPU path (8-bit weights are slow without it)
    form: str = "matmulnbits"
    # modules kept at 8 bits where the quality budget needs it (export/quality.py: `ladder`), by name prefix:
    # "lm_head", "layers.0", ... (always written as DequantizeLinear)
    eight_bit: tuple = ()

    def describe(self) -> dict:
        return {**asdict(self), "symmetric": True, "zero_points": None,
                "scales": "one per block, in the weight's float type (float32 or float16)",
                "float": ["vision encoder", "embedding table (fp16)", "norms", "RoPE", "softmax", "attention",
                          "DeepStack adds", "KV cache"]}


def blocks(text_config) -> tuple[int, ...]:
    """The block sizes that fit every decoder product's inner size (hidden, FFN, heads x head_dim): a whole number of
    blocks, and at least two (MIGraphX refuses a blocked scale with one block along K: "y_scale must have size > 1
    along provided axis(0) for block granularity")."""
    inner = (text_config.hidden_size, text_config.intermediate_size,
             text_config.num_attention_heads * text_config.head_dim)
    return tuple(b for b in BLOCKS if all(k % b == 0 and k >= 2 * b for k in inner))


def default_block(text_config) -> int:
    """The largest block that fits (`blocks`): 128 for every Qwen3-VL size, smaller only for the small test models
    (micro 64, tiny 32), so that every product is quantized; the smallest where none fits (the export refuses it)."""
    return max(blocks(text_config), default=BLOCKS[0])


def quantize_blocks(w: np.ndarray, bits: int, block: int, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] float -> codes [N, K] int8 in [-2^(bits-1), 2^(bits-1) - 1] and scales [N, K/block] of
    `scale_dtype`, with w ~= codes * scale blockwise along K."""
    n, k = w.shape
    blocks = np.asarray(w, np.float32).reshape(n, k // block, block)
    idx = np.abs(blocks).argmax(axis=2)[..., None]
    scales = np.take_along_axis(blocks, idx, axis=2)[..., 0] / -float(2 ** (bits - 1))
    scales = scales.astype(scale_dtype).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales).astype(np.float32)
    codes = np.clip(np.round(blocks / safe[..., None]), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return codes.astype(np.int8).reshape(n, k), scales.astype(scale_dtype)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values (0..15) along the last axis -> one byte each, the first in the low nibble (the
    layout of both MatMulNBits and ONNX's INT4/UINT4 tensors)."""
    pairs = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] & 0x0F) | ((pairs[..., 1] & 0x0F) << 4)


def dequantize(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """The float weights a quantized [N, K] matrix stands for (tests and the quality report use it)."""
    n, k = codes.shape
    return (codes.reshape(n, k // block, block).astype(np.float32) * scales[..., None].astype(np.float32)).reshape(n, k)


@dataclass
class _Weight:
    """A float weight a MatMul or Gemm reads, stored in an external data file."""
    location: str
    offset: int
    length: int
    dims: tuple
    transposed: bool  # stored [N, K] (Gemm transB=1: the LM head) rather than [K, N]
    module: str  # the PyTorch module it came from ("layers.3.mlp.down_proj", "lm_head")
    data_type: int = TensorProto.FLOAT  # or FLOAT16 (an fp16 export): the scales are written in it

    @property
    def dtype(self):
        return np.float16 if self.data_type == TensorProto.FLOAT16 else np.float32

    @property
    def kn(self) -> tuple[int, int]:
        return (self.dims[1], self.dims[0]) if self.transposed else tuple(self.dims)


def _external(tensor: TensorProto) -> dict | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    return {"location": info["location"], "offset": int(info.get("offset", 0)), "length": int(info["length"])}


def _targets(model: onnx.ModelProto, block: int) -> dict[str, _Weight]:
    """The nodes to quantize (by node output name): MatMul(x, W) and Gemm(x, W) with W a 2-D float external weight
    whose inner dim is a whole number of blocks, each with the module it came from."""
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in inits:
            continue
        tensor = inits[node.input[1]]
        where = _external(tensor)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = len(node.input) == 2 and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0
        if node.op_type == "Gemm" and not plain:  # a bias, a transposed input or a scale: not a plain product
            continue
        transposed = bool(attrs.get("transB", 0))
        if where is None or len(tensor.dims) != 2 or tensor.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        weight = _Weight(**where, dims=tuple(tensor.dims), transposed=transposed, module=_module(node),
                         data_type=tensor.data_type)
        if weight.kn[0] % block == 0:
            found[node.output[0]] = weight
    return found


def _module(node) -> str:
    """The module a traced Linear came from, from the name scopes torch.onnx writes into each node's metadata;
    a Gemm without them is the LM head (the exporter writes the head as the one 2-D Gemm)."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    if len(scopes) >= 2:
        return scopes[-2]
    return "lm_head" if node.op_type == "Gemm" else node.name


def _read_nk(folder: Path, w: _Weight, rows: slice) -> np.ndarray:
    """Output columns `rows` of a weight as [n, K] float32, read from its memory-mapped data file."""
    data = np.memmap(folder / w.location, dtype=w.dtype, mode="r", offset=w.offset, shape=tuple(w.dims))
    return np.ascontiguousarray(data[rows] if w.transposed else data[:, rows].T, dtype=np.float32)


class _DataFile:
    """The one weights file both decoder graphs point into, written tensor by tensor."""

    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, open(path, "wb"), 0

    def write(self, name: str, arrays, dtype: int, dims) -> TensorProto:
        pad = -self.offset % ALIGN
        self.file.write(b"\0" * pad)
        start = self.offset = self.offset + pad
        for array in arrays:  # pieces of one tensor, in order
            self.file.write(np.ascontiguousarray(array).tobytes())
            self.offset += array.nbytes
        tensor = TensorProto(name=name, data_type=dtype, dims=list(dims), data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(start)),
                           ("length", str(self.offset - start))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self):
        self.file.close()


def quantize_folder(folder: Path, out: Path, scheme: Scheme, graphs=("decoder", "prefill"), log=print) -> dict:
    """Write `graphs` of `folder` to `out` with their quantizable MatMul/Gemm nodes in `scheme`'s form and every
    external weight of both graphs in one `decoder.onnx.data`. Returns counts and bytes for the manifest."""
    if scheme.form not in FORMS:
        raise ValueError(f"unknown quantized form {scheme.form!r}; use one of {', '.join(FORMS)}")
    models = {g: onnx.load(str(folder / f"{g}.onnx"), load_external_data=False) for g in graphs}
    out.mkdir(parents=True, exist_ok=True)
    data = _DataFile(out / f"{graphs[0]}.onnx.data")
    written: dict = {}  # (location, offset) -> the new tensors, shared by both graphs
    stats = {"quantized_matrices": 0, "float_bytes": 0, "quantized_bytes": 0}
    errors = []  # per matrix: Frobenius norm of the rounding error over that of the weight
    for graph, model in models.items():
        targets = _targets(model, scheme.block_size)
        nodes, keep = [], []
        for node in model.graph.node:
            weight = targets.get(node.output[0])
            if weight is None:
                nodes.append(node)
                continue
            key = (weight.location, weight.offset)
            if key not in written:
                written[key], error = _write_quantized(folder, weight, data, scheme, f"q{len(written)}")
                errors.append(error)
                stats["quantized_matrices"] += 1
                stats["float_bytes"] += weight.length
                stats["quantized_bytes"] += sum(int(_external(t)["length"]) for t in written[key])
            nodes += _replacement(node, weight, written[key], scheme)
            keep += written[key]
        used = {i for n in nodes for i in n.input}
        for tensor in model.graph.initializer:
            where = _external(tensor)
            if tensor.name not in used:
                continue
            if where is None:
                keep.append(tensor)
                continue
            key = (where["location"], where["offset"])
            if key not in written:  # a float weight: copied over as it is
                raw = np.memmap(folder / where["location"], np.uint8, "r", where["offset"], (where["length"],))
                written[key] = [data.write(f"f{len(written)}", [raw], tensor.data_type, tensor.dims)]
            copy = TensorProto()
            copy.CopyFrom(written[key][0])
            copy.name = tensor.name
            keep.append(copy)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        del model.graph.initializer[:]
        model.graph.initializer.extend({t.name: t for t in keep}.values())  # a weight two nodes read: once
        _set_opsets(model)
    data.close()
    for graph, model in models.items():
        onnx.save_model(model, str(out / f"{graph}.onnx"))
    stats["weight_rel_error"] = {"max": max(errors), "mean": sum(errors) / len(errors)}
    log(f"quantized {stats['quantized_matrices']} matrices: {stats['float_bytes'] / 2**20:.0f} MiB of float -> "
        f"{stats['quantized_bytes'] / 2**20:.0f} MiB; weight error |W - Wq| / |W| mean "
        f"{stats['weight_rel_error']['mean']:.4f}, max {stats['weight_rel_error']['max']:.4f}")
    return stats


def _bits_form(w: _Weight, scheme: Scheme) -> tuple[int, str]:
    """8-bit weights are always written as DequantizeLinear: MIGraphX parses MatMulNBits at 4 bits only, and ONNX
    Runtime fuses an int8 DequantizeLinear + MatMul into an 8-bit MatMulNBits (accuracy level 4) all the same."""
    eight = any(w.module == p or w.module.startswith(p + ".") for p in scheme.eight_bit)
    bits = 8 if eight else scheme.bits
    return bits, scheme.form if bits == 4 else "dequantizelinear"


def _write_quantized(folder: Path, w: _Weight, data: _DataFile, scheme: Scheme,
                     name: str) -> tuple[list[TensorProto], float]:
    """Quantize one weight a slab of output columns at a time and append it to the data file (packed codes, then
    scales): memory stays a few slabs, whatever the model's size. Also returns |W - Wq|_F / |W|_F."""
    bits, form = _bits_form(w, scheme)
    k, n = w.kn
    codes, scales, squares = [], [], np.zeros(2)
    for start in range(0, n, ROWS_PER_PASS):
        slab = _read_nk(folder, w, slice(start, min(n, start + ROWS_PER_PASS)))
        c, s = quantize_blocks(slab, bits, scheme.block_size, w.dtype)
        squares += (float(np.square(slab - dequantize(c, s, scheme.block_size)).sum()), float(np.square(slab).sum()))
        if form == "matmulnbits":  # [n, K/block, block*bits/8] of unsigned codes
            u = (c.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
            codes.append(pack_nibbles(u) if bits == 4 else u)
            scales.append(s)
        else:  # DequantizeLinear wants [K, N] row-major: gathered whole below (the transposed slabs interleave)
            codes.append(c)
            scales.append(s)
    if form == "matmulnbits":
        blocks = k // scheme.block_size
        b = data.write(f"{name}.B", codes, TensorProto.UINT8, (n, blocks, scheme.block_size * bits // 8))
        sc = data.write(f"{name}.scales", scales, w.data_type, (n, blocks))
        return [b, sc], float(np.sqrt(squares[0] / max(squares[1], 1e-30)))
    kn = np.concatenate(codes).T  # [K, N] int8 codes: 1 byte per code while packing, then half that
    flat = kn.reshape(-1)
    packed = pack_nibbles(flat) if bits == 4 else flat
    b = data.write(f"{name}.B", [packed], TensorProto.INT4 if bits == 4 else TensorProto.INT8, (k, n))
    sc = data.write(f"{name}.scales", [np.concatenate(scales).T], w.data_type, (k // scheme.block_size, n))
    return [b, sc], float(np.sqrt(squares[0] / max(squares[1], 1e-30)))


def _replacement(node, w: _Weight, tensors, scheme: Scheme) -> list:
    b, scales = tensors[0].name, tensors[1].name
    k, n = w.kn
    bits, form = _bits_form(w, scheme)
    if form == "matmulnbits":
        return [helper.make_node("MatMulNBits", [node.input[0], b, scales], list(node.output), name=node.name + "_q",
                                 domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=scheme.block_size,
                                 accuracy_level=scheme.accuracy_level)]
    weight = node.output[0] + "_w"
    return [helper.make_node("DequantizeLinear", [b, scales], [weight], name=node.name + "_dq", axis=0,
                             block_size=scheme.block_size),
            helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=node.name + "_q")]


def _set_opsets(model: onnx.ModelProto) -> None:
    """MatMulNBits lives in com.microsoft (version 1); blocked DequantizeLinear needs ONNX opset 21. The ops the
    exporter wrote at opset 18 mean the same at 21 for the types used here."""
    opsets = {o.domain: o for o in model.opset_import}
    ops = {n.op_type for n in model.graph.node}
    if "MatMulNBits" in ops and MS_DOMAIN not in opsets:
        model.opset_import.add(domain=MS_DOMAIN, version=1)
    if "DequantizeLinear" in ops:
        opsets[""].version = max(opsets[""].version, 21)
