"""Every graph on MIGraphX's own code, without a GPU: its ONNX parser, its passes and its "ref" target.

    python -m export.check graphs/NAME --migraphx [--frame 64x96] [--capacity N]

Each graph is parsed with exactly the static input dims the runtime's static path fixes (the vision encoder for
one temporal patch of a frame size, `prefill.onnx` over that chunk's vision tokens + SHELL_TOKENS, `decoder.onnx`
over one token at every batch size of the batched decode step (1, 2, 4, 8), the cache capacity plus its scratch
slot, `cache_write` for both step sizes, `cache_rope`),
compiled for the `ref` target (plain C++ reference kernels) and run on the same random inputs as ONNX Runtime's
CPU provider; every output must agree within the export's budget for its dtype (`verify.RTOL`), integer outputs
exactly. The report names, per graph, how MIGraphX's parser rewrote each ONNX op (e.g. Expand -> multibroadcast)
and which ops it folded into constants at parse time.

`cache_write.onnx` is also run the way the static path uses it: its cache outputs are fed back as the next step's
inputs (the runtime binds them to one device buffer), and no other instruction may read a cache input (see
`in_place_write`). What only a GPU can prove (kernels, fusions, speed, the EP's placement) is not proven here.

MIGraphX's Python module is not on PyPI: `eval "$(../shared/tools/migraphx-ref/install.sh .cache/migraphx-ref)"`.
"""

import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from runtime.batch import BUCKETS
from runtime.commentator import SHELL_TOKENS, Commentator, StreamConfig
from runtime.manifest import Manifest
from runtime.model import DTYPES, Model
from runtime.vision_index import vision_inputs

from .verify import RTOL

FRAME = (64, 96)  # pixels (height, width) of the default check: small, the ref target runs naive loops
CACHE_PARTS = ("key", "key_raw", "value")


class Unavailable(Exception):
    """MIGraphX's Python module cannot be imported here; the message says why and how to get it."""


def load():
    try:
        import migraphx
    except ImportError as error:  # also a missing system library (libprotobuf.so.32) of the module
        raise Unavailable(f"MIGraphX's Python module is not importable ({error}); run "
                          "`eval \"$(../shared/tools/migraphx-ref/install.sh .cache/migraphx-ref)\"` first") from None
    return migraphx


@dataclass
class Case:
    graph: str
    dims: dict  # the named dims the runtime fixes for this session
    grid: tuple | None = None  # the vision encoder's patch grid (rows, cols)

    @property
    def label(self) -> str:
        fixed = ", ".join(f"{k}={v}" for k, v in sorted(self.dims.items()) if k != "batch" or v != 1)
        return f"{self.graph}.onnx ({fixed})"


@dataclass
class Result:
    case: Case
    errors: dict = field(default_factory=dict)  # output -> max abs error against ONNX Runtime
    tolerances: dict = field(default_factory=dict)
    rewrites: dict = field(default_factory=dict)  # ONNX op -> the MIGraphX ops it became
    folded: list = field(default_factory=list)  # ONNX ops computed at parse time (no instruction left)
    seconds: float = 0.0
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def static_cases(manifest: Manifest, frame=FRAME, capacity: int | None = None, batches=BUCKETS) -> list[Case]:
    """The session shapes the static path creates for a video of `frame` pixels, as StaticEngine sizes them, and
    the decoder at every batch size the server's batched decode step compiles (`batches`)."""
    prep = manifest["preprocess"]
    p, m = prep["patch_size"], prep["merge_size"]
    if frame[0] % (p * m) or frame[1] % (p * m):
        raise ValueError(f"frame {frame[0]}x{frame[1]} is not a multiple of {p * m} pixels (patch x merge)")
    grid_h, grid_w = frame[0] // p, frame[1] // p
    vision_tokens = grid_h * grid_w // (m * m)  # one temporal patch per chunk (2 frames)
    if capacity is None:  # the default the stream would choose for this frame size
        capacity = Commentator(Model(manifest), StreamConfig(static=True)).capacity(vision_tokens)
    prefill, past = vision_tokens + SHELL_TOKENS, capacity + 1  # + the scratch slot padded tokens write to
    if capacity < prefill:
        raise ValueError(f"a cache of {capacity} slots cannot take a prefill of {prefill} tokens")
    return [Case("vision", {"frames": 1, "patches": grid_h * grid_w}, (grid_h, grid_w)),
            Case("prefill", {"batch": 1, "past": past, "new": prefill}),
            *(Case("decoder", {"batch": b, "past": past, "new": 1}) for b in sorted({1, *batches})),
            Case("cache_write", {"past": past, "new": prefill}),
            Case("cache_write", {"past": past, "new": 1}),
            Case("cache_rope", {"past": past})]


def input_shapes(manifest: Manifest, case: Case) -> dict:
    return {v["name"]: [d if isinstance(d, int) else case.dims[d] for d in v["shape"]]
            for v in manifest["graphs"][case.graph]["inputs"]}


def random_feeds(manifest: Manifest, case: Case, rng) -> dict:
    """Inputs the runtime could send: random floats, real vision index data, valid positions, masks and slots."""
    shapes, float_dtype = input_shapes(manifest, case), DTYPES[manifest["dtype"]]
    feeds = {}
    if case.grid:
        vision = manifest["vision"]
        feeds.update(vision_inputs(*case.grid, vision["spatial_merge_size"], vision["position_grid_side"]))
    for name, shape in shapes.items():
        if name in feeds:
            continue
        if name in ("position_ids", "positions"):
            feeds[name] = rng.integers(0, 4096, shape)
        elif name == "slots":  # distinct: ONNX leaves the order of duplicate ScatterND writes undefined
            feeds[name] = rng.permutation(case.dims["past"])[:shape[0]]
        elif name in ("past_mask", "mask"):
            feeds[name] = rng.integers(0, 2, shape)
        elif name == "new_mask":  # a left-padded chunk, as the static prefill sends it
            feeds[name] = np.broadcast_to(np.arange(shape[-1]) >= min(2, shape[-1] - 1), shape).astype(np.int64)
        else:
            feeds[name] = rng.standard_normal(shape, dtype=np.float32)
    dtypes = {v["name"]: v["dtype"] for v in manifest["graphs"][case.graph]["inputs"]}
    return {k: v.astype(float_dtype if dtypes[k] != "int64" else np.int64) for k, v in feeds.items()}


def run_case(migraphx, model: Model, case: Case, feeds: dict) -> Result:
    """Parse, compile for `ref`, run; compare every output with ONNX Runtime's CPU session of the same shapes."""
    manifest, result, start = model.manifest, Result(case), time.perf_counter()
    path = str(manifest.path(manifest["graphs"][case.graph]["file"]))
    try:
        program = migraphx.parse_onnx(path, map_input_dims=input_shapes(manifest, case), use_debug_symbols=True)
    except RuntimeError as error:  # an op, attribute or shape rule the parser refuses
        result.problems.append(f"{case.label}: MIGraphX cannot parse it: {_first_line(error)}")
        return result
    result.rewrites, result.folded = rewrites(program, manifest, case.graph)
    try:
        program.compile(migraphx.get_target("ref"))
        outputs = [np.array(o) for o in program.run({n: migraphx.argument(feeds[n])
                                                     for n in program.get_parameter_names()})]
    except RuntimeError as error:
        result.problems.append(f"{case.label}: MIGraphX cannot compile or run it: {_first_line(error)}")
        return result
    quantized = manifest["graphs"][case.graph].get("quantized")
    expected = (_exact_session(path, case) if quantized else model.session(case.graph, case.dims)).run(None, feeds)
    names = [v["name"] for v in manifest["graphs"][case.graph]["outputs"]]
    if len(outputs) != len(names):
        result.problems.append(f"{case.label}: MIGraphX returns {len(outputs)} outputs, the graph has {len(names)}")
    for name, actual, reference in zip(names, outputs, expected):
        if actual.shape != reference.shape or actual.dtype != reference.dtype:
            result.problems.append(f"{case.label}: {name} is {actual.dtype}{list(actual.shape)} on MIGraphX, "
                                   f"{reference.dtype}{list(reference.shape)} on ONNX Runtime")
            continue
        exact = reference.dtype.kind in "iub"  # integer outputs (the cache mask) must be equal
        error = float(np.abs(actual.astype(np.float64) - reference).max())
        tolerance = 0.0 if exact else RTOL[manifest["dtype"]] * max(1.0, float(np.abs(reference).max()))
        result.errors[name], result.tolerances[name] = error, tolerance
        if not error <= tolerance:
            result.problems.append(f"{case.label}: {name} differs from ONNX Runtime by {error:.3e} "
                                   f"(tolerance {tolerance:.1e})")
    result.seconds = time.perf_counter() - start
    return result


def _exact_session(path: str, case: Case):
    """ONNX Runtime computing a quantized graph as MIGraphX does: weights dequantized, activations in float.
    (The exported accuracy_level 4 rounds activations to int8 per block on the CPU, ~1e-2 relative, which would
    hide a real difference.) The copy lies beside the graph, so its external weights resolve, and is removed."""
    import onnxruntime as ort

    graph = onnx.load(path, load_external_data=False)
    for node in graph.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    copy = Path(path).with_suffix(".exact.onnx")
    onnx.save_model(graph, str(copy))
    try:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        for name, value in case.dims.items():
            options.add_free_dimension_override_by_name(name, int(value))
        return ort.InferenceSession(str(copy), options, providers=["CPUExecutionProvider"])
    finally:
        copy.unlink()


def _first_line(error) -> str:
    return str(error).strip().splitlines()[0][:300]


# one instruction of a printed program, with debug symbols: `@12 = multibroadcast[...](@7) -> ... # node_mul_3`
# (the ONNX node's name; `migx_uid:Mul_11` for an unnamed node)
_INSTRUCTION = re.compile(r"^(?P<out>\S+) = (?P<op>@?[\w:]+)(?:\[.*?\])?(?:\((?P<args>[^()]*)\))?"
                          r"(?: ->.*?)?(?: # (?:migx_uid:)?(?P<symbol>\S+))?$")


def instructions(program) -> list[dict]:
    """The instructions of a program's main module as {out, op, args, symbol}, literals and parameters left out."""
    found = []
    for line in str(program).splitlines():
        match = _INSTRUCTION.match(line.strip())
        if match and not match["op"].startswith("@"):
            found.append({"out": match["out"], "op": match["op"], "args": (match["args"] or "").split(","),
                          "symbol": match["symbol"]})
    return found


def rewrites(program, manifest: Manifest, graph: str) -> tuple[dict, list]:
    """What the parser made of each ONNX op type: {op: [MIGraphX ops]}, and the op types it left no instruction
    for (computed at parse time from constants and static shapes, e.g. Shape)."""
    model = onnx.load(str(manifest.path(manifest["graphs"][graph]["file"])), load_external_data=False)
    op_of = {node.name: node.op_type for node in model.graph.node if node.name}
    made = defaultdict(set)
    for ins in instructions(program):
        if ins["symbol"]:
            made[op_of.get(ins["symbol"], ins["symbol"].rsplit("_", 1)[0])].add(ins["op"])
    types = sorted({node.op_type for node in model.graph.node})
    return {t: sorted(made[t]) for t in types if t in made}, [t for t in types if t not in made]


def in_place_write(migraphx, model: Model, case: Case, rng) -> list[str]:
    """cache_write as the static path runs it: its outputs are the buffers it reads (bound in place on a GPU).

    Aliasing an output to its input can only change a result if some instruction reads the input after the
    scatter wrote the output: so no instruction but the ScatterND that writes a cache output may read that
    cache input. Then two steps run on one set of buffers (outputs written back into the inputs, as the bound
    device buffers hold them) must leave both steps' K/V in their slots and every other slot untouched."""
    manifest, problems = model.manifest, []
    path = str(manifest.path(manifest["graphs"]["cache_write"]["file"]))
    program = migraphx.parse_onnx(path, map_input_dims=input_shapes(manifest, case))
    caches = [f"{part}.{i}" for part in CACHE_PARTS for i in range(model.layers)] + ["mask"]
    readers = defaultdict(list)
    for ins in instructions(program):
        for arg in ins["args"]:
            readers[arg].append(ins["op"])
    for name in caches:
        if len(readers[name]) != 1 or not readers[name][0].startswith("scatternd"):
            problems.append(f"{case.label}: cache input {name} is read by {readers[name]}, not only by the "
                            "ScatterND that writes it: binding its output in place could change the result")
    program.compile(migraphx.get_target("ref"))
    buffers = {k: v.copy() for k, v in random_feeds(manifest, case, rng).items() if k in caches}
    expected = {k: v.copy() for k, v in buffers.items()}
    for _ in range(2):
        step = random_feeds(manifest, case, rng)
        step["slots"] = rng.permutation(case.dims["past"])[:case.dims["new"]]
        before = {k: v.copy() for k, v in buffers.items()}
        outputs = program.run({n: migraphx.argument(buffers.get(n, step[n])) for n in program.get_parameter_names()})
        if any(not np.array_equal(before[k], buffers[k]) for k in buffers):
            problems.append(f"{case.label}: the ref target wrote into an input buffer")
        names = [v["name"].replace("_out", "") for v in manifest["graphs"]["cache_write"]["outputs"]]
        for name, output in zip(names, outputs):
            np.copyto(buffers[name], np.array(output))  # what an output bound to the input's buffer holds
            source = step["new_mask"] if name == "mask" else step[f"new_{name}"]
            if name == "mask":
                expected[name][0, step["slots"]] = source
            else:
                expected[name][:, :, step["slots"]] = source
    for name in caches:
        if not np.array_equal(buffers[name], expected[name]):
            problems.append(f"{case.label}: after two in-place steps {name} is not the cache with both steps' "
                            "K/V in their slots")
    return problems


def check(manifest: Manifest, frame=FRAME, capacity: int | None = None, seed: int = 0,
          log=print, batches=BUCKETS) -> tuple[list, list[str]]:
    """Every graph at every static shape set: (results, problems). Raises Unavailable without the module."""
    migraphx = load()
    model, rng = Model(manifest), np.random.default_rng(seed)
    results, problems = [], []
    for case in static_cases(manifest, frame, capacity, batches):
        result = run_case(migraphx, model, case, random_feeds(manifest, case, rng))
        if case.graph == "cache_write" and not result.problems:
            result.problems += in_place_write(migraphx, model, case, rng)
            result.notes.append("in place: each cache input is read only by the ScatterND writing it; two steps "
                                "on one set of buffers leave both steps' K/V in their slots")
        results.append(result)
        problems += result.problems
        log(describe(result))
    return results, problems


def describe(result: Result) -> str:
    if result.errors and not result.problems:
        worst = max(result.errors, key=result.errors.get)
        status = (f"parsed, compiled, matches ONNX Runtime on {len(result.errors)} outputs (max abs error "
                  f"{result.errors[worst]:.1e}, {worst})")
    else:
        status = "FAILS"
    lines = [f"{result.case.label}: {status} in {result.seconds:.1f} s"]
    renamed = [f"{op}->{'+'.join(ops)}" for op, ops in result.rewrites.items() if ops != [_snake(op)]]
    if renamed:
        lines.append(f"  rewritten: {', '.join(renamed)}")
    if result.folded:
        lines.append(f"  folded at parse time: {', '.join(result.folded)}")
    lines += [f"  {note}" for note in result.notes if not result.problems]
    lines += [f"  {p}" for p in result.problems]
    return "\n".join(lines)


def _snake(op: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower()
