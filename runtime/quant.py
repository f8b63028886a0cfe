"""Quantized graphs: refuse at load the configurations ONNX Runtime runs slower than the float graph.

Measured on ONNX Runtime 1.32's CPU provider (issue 12): with `session.disable_prepacking` MatMulNBits dequantizes
its whole weight on every call (~70x slower); 8-bit weights without accuracy_level 4, and float zero points, take
reference paths slower than fp32. A user who gets such a graph should hear so at load, not find a stream at a tenth
of its speed.
"""

import onnx

from .manifest import ManifestError

QUANTIZED_OPS = ("MatMulNBits", "DequantizeLinear")
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def slow_configuration(path, prepacking: bool) -> str | None:
    """Why the graph at `path` would run slowly with these session settings, or None."""
    graph = onnx.load(str(path), load_external_data=False).graph
    types = {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        where = f"{path.name}: MatMulNBits node {node.name or node.output[0]}"
        if not prepacking:
            return f"{where} with prepacking disabled dequantizes its whole weight on every call"
        if attrs.get("bits", 4) != 4 and attrs.get("accuracy_level", 0) != 4:
            return f"{where} has {attrs.get('bits')}-bit weights without accuracy_level 4 (a slow reference path)"
        if len(node.input) > 3 and node.input[3] and types.get(node.input[3]) in FLOAT_TYPES:
            return f"{where} has float zero points (a slow reference path); quantize symmetric or with integer ones"
    return None


def check(path, prepacking: bool) -> None:
    reason = slow_configuration(path, prepacking)
    if reason:
        raise ManifestError(f"refusing a slow quantized graph: {reason}; export it again with this version "
                            "(make export ... QUANT=int4 FORCE=1)")
