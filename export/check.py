"""Graph lint: would every node run as exported, with static shapes, on the MIGraphX execution provider?

    python -m export.check graphs/NAME
    python -m export.check graphs/NAME --migraphx [--frame 64x96] [--capacity N] [--batch-sizes 1,2,4,8]

Checks every node of every graph in the manifest: op types MIGraphX takes (and no control flow or NonZero),
shape-like inputs (Reshape shape, Slice bounds, Expand shape, ...) that derive from constants or `Shape` only,
never from tensor values, refused modes, tensor dtypes; that every input dim is static once the runtime fixes
its named dims; and each graph's inputs and outputs against the manifest. Prints each offender by node name and exits 1 if there is any. Rules: `migraphx_ops.json`.
`--migraphx` then runs every graph on MIGraphX's own parser and reference target (`export/migraphx_ref.py`).
"""

import argparse
import json
import sys
from pathlib import Path

import onnx

from runtime.manifest import Manifest, ManifestError, ONNX_DTYPES

RULES = json.loads((Path(__file__).parent / "migraphx_ops.json").read_text())
FORBIDDEN = {"Loop", "If", "Scan", "NonZero", "SequenceConstruct", "SequenceAt", "SplitToSequence",
             "ConcatFromSequence", "Unique"}  # control flow and data-dependent output shapes
SHAPE_SOURCES = {"Shape", "Size", "Constant"}
# The symbolic input dims the static-shape runtime fixes per session (free-dimension overrides); any other
# symbolic input dim would reach MIGraphX unresolved and be compiled again for every new value.
FIXED_DIMS = {"batch", "past", "new", "frames", "patches"}


def check_model(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    problems = []
    static = {init.name for init in graph.initializer}  # tensors whose values are known before any input arrives
    allowed_types = {getattr(onnx.TensorProto, t) for t in RULES["allowed_types"]}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    for node in graph.node:
        where = f"{node.op_type} node {node.name or '(unnamed)'}"
        if node.op_type in FORBIDDEN:
            problems.append(f"{where}: {node.op_type} is not allowed (control flow or value-dependent shape)")
        elif node.op_type not in RULES["supported_ops"]:
            problems.append(f"{where}: op {node.op_type} is not supported by the MIGraphX execution provider")
        for index in RULES["constant_inputs"].get(node.op_type, []):
            if index < len(node.input) and node.input[index] and node.input[index] not in static:
                problems.append(f"{where}: input {index} ({node.input[index]}) depends on tensor values; "
                                "shape inputs must come from constants or Shape")
        problems += [f"{where}: {mode}" for mode in _refused_modes(node)]
        for name in [*node.input, *node.output]:
            if name and name in types and types[name] not in allowed_types:
                problems.append(f"{where}: tensor {name} has a dtype MIGraphX refuses ({types[name]})")
        if node.op_type in SHAPE_SOURCES or all(i in static for i in node.input if i):
            static.update(node.output)
    return problems


def _refused_modes(node) -> list[str]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("Resize", "Upsample") and attrs.get("mode") == b"cubic":
        return ["cubic Resize is refused"]
    if node.op_type == "Pad" and attrs.get("mode", b"constant") not in (b"constant", b"reflect"):
        return [f"Pad mode {attrs['mode'].decode()} is refused"]
    if node.op_type in ("ArgMax", "ArgMin") and attrs.get("select_last_index", 0):
        return ["select_last_index is refused"]
    # MIGraphX parses MatMulNBits (ROCm >= 6.3) as 4-bit weights, symmetric or with zero points, without g_idx
    if node.op_type == "MatMulNBits" and attrs.get("bits", 4) != 4:
        return [f"{attrs['bits']}-bit MatMulNBits is refused (4-bit only); export with --quant-form dequantizelinear"]
    if node.op_type == "MatMulNBits" and len(node.input) > 4 and node.input[4]:
        return ["MatMulNBits with g_idx is refused"]
    return []


def check_static_inputs(model: onnx.ModelProto) -> list[str]:
    """Every input dim is a number or one the runtime fixes, so each session's shapes are all static."""
    return [f"input {v.name} has a dim {d.dim_param or '(unnamed)'!r} that the runtime does not fix"
            for v in model.graph.input for d in v.type.tensor_type.shape.dim
            if not d.HasField("dim_value") and d.dim_param not in FIXED_DIMS]


def check_file(path) -> list[str]:
    """Every rule that needs only the graph itself (the export runs these before its manifest exists)."""
    model = onnx.load(str(path), load_external_data=False)
    return check_model(model) + check_static_inputs(model)


def check_contract(model: onnx.ModelProto, contract: dict) -> list[str]:
    """The graph's inputs and outputs must be exactly those the manifest promises."""
    def describe(values):
        return [{"name": v.name, "dtype": ONNX_DTYPES.get(v.type.tensor_type.elem_type),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    problems = []
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        if describe(values) != contract[kind]:
            problems.append(f"{kind} differ from the manifest: graph has {[v.name for v in values][:6]}...")
    return problems


def check(root: str | Path) -> list[str]:
    manifest = Manifest.load(root)
    problems = []
    for name, contract in manifest["graphs"].items():
        path = manifest.path(contract["file"])
        found = check_file(path) + check_contract(onnx.load(str(path), load_external_data=False), contract)
        problems += [f"{contract['file']}: {p}" for p in found]
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.check", description=__doc__.splitlines()[0])
    parser.add_argument("graphs", help="an export folder (graphs/NAME)")
    parser.add_argument("--migraphx", action="store_true",
                        help="also parse, compile and run every graph on MIGraphX's ref target (CPU)")
    parser.add_argument("--frame", default="64x96", help="frame HEIGHTxWIDTH in pixels the static shapes follow")
    parser.add_argument("--capacity", type=int, help="KV cache slots (default: what the stream would choose)")
    parser.add_argument("--batch-sizes", default="1,2,4,8",
                        help="the batch sizes of the server's batched decode step (its --batch-sizes)")
    args = parser.parse_args(argv)
    try:
        problems = check(args.graphs)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    print(f"{args.graphs}: {'ready for MIGraphX' if not problems else f'{len(problems)} problem(s)'}")
    if args.migraphx and not problems:
        from . import migraphx_ref

        try:
            frame = tuple(int(x) for x in args.frame.lower().split("x"))
            if len(frame) != 2:
                raise ValueError(f"--frame {args.frame!r} is not HEIGHTxWIDTH")
            batches = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
            _, problems = migraphx_ref.check(Manifest.load(args.graphs), frame, args.capacity, batches=batches)
        except (migraphx_ref.Unavailable, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        verdict = "every graph matches ONNX Runtime" if not problems else f"{len(problems)} problem(s)"
        print(f"{args.graphs}: {verdict} on MIGraphX (ref target)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
