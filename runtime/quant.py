"""Quantized graphs: refuse at load the configurations ONNX Runtime runs slower than the float graph.

Measured on ONNX Runtime 1.32's CPU provider (issue 12): with `session.disable_prepacking` MatMulNBits dequantizes
its whole weight on every call (~70x slower); 8-bit weights without accuracy_level 4, and float zero points, take
reference paths slower than fp32. A user who gets such a graph should hear so at load, not find a stream at a tenth
of its speed. The exporter writes each graph's MatMulNBits settings into its contract in the manifest
(`quantized.matmulnbits`), so this check reads the manifest, not the graph (the runtime does not need `onnx`).
"""

from .manifest import ManifestError


def slow_configuration(contract: dict, prepacking: bool) -> str | None:
    """Why the graph of this manifest contract would run slowly with these session settings, or None."""
    for node in contract.get("quantized", {}).get("matmulnbits", []):
        where = f"{contract['file']}: MatMulNBits"
        if not prepacking:
            return f"{where} with prepacking disabled dequantizes its whole weight on every call"
        if node["bits"] != 4 and node["accuracy_level"] != 4:
            return f"{where} has {node['bits']}-bit weights without accuracy_level 4 (a slow reference path)"
        if node["zero_points"] == "float":
            return f"{where} has float zero points (a slow reference path); quantize symmetric or with integer ones"
    return None


def check(contract: dict, prepacking: bool) -> None:
    reason = slow_configuration(contract, prepacking)
    if reason:
        raise ManifestError(f"refusing a slow quantized graph: {reason}; export it again with this version "
                            "(make export ... QUANT=int4 FORCE=1)")
