"""Where a decoder step's time goes, from ONNX Runtime's profiler: by op type, and split into weight products
(MatMul/Gemm on a weight, MatMulNBits: what int4 makes cheaper) and the rest (attention over the cache, norms,
RoPE, ...: what int4 leaves as it is), so that a quantized step's best possible speed-up is read off the profile.

    python -m bench.profile GRAPHS [GRAPHS ...] [--past 8192] [--new 740] [--runs 3]
"""

import argparse
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import onnx

from runtime.manifest import Manifest
from runtime.model import Model

from .measure import step_feeds

def profile(graphs: Path, past: int, new: int, runs: int = 3, threads: int = 0) -> dict:
    """Kernel ms per op type (the median of `runs` after a warm-up) of one step of `new` tokens onto `past`, in a
    session made as the runtime makes it."""
    model = Model(Manifest.load(graphs), threads=threads)
    graph = model.step_graph(new)
    proto = onnx.load(str(model.manifest.path(f"{graph}.onnx")), load_external_data=False).graph
    weights = {t.name for t in proto.initializer}
    dequantized = {o for n in proto.node if n.op_type == "DequantizeLinear" for o in n.output}
    on_weight = {n.name for n in proto.node if n.op_type == "MatMulNBits" or (
        n.op_type in ("MatMul", "Gemm") and (n.input[1] in weights or n.input[1] in dequantized))}
    folder = tempfile.mkdtemp()
    model.profile_prefix = f"{folder}/"
    session = model.session(graph)
    feeds = step_feeds(model, past, new)
    for _ in range(runs + 1):
        session.run(["logits"], feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    shutil.rmtree(folder)
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                   and e["name"] == "model_run")
    runs_ms = [defaultdict(float) for _ in spans]  # per run: {kind: ms}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][:-len("_kernel_time")]
            run = next(i for i, (a, b) in enumerate(spans) if a <= e["ts"] <= b)
            runs_ms[run]["weight products" if node in on_weight else e["args"].get("op_name", "?")] += e["dur"] / 1e3
    timed = sorted(runs_ms[1:], key=lambda r: sum(r.values()))  # the first run warms up
    middle = timed[len(timed) // 2]
    total = sum(middle.values())
    products = middle.get("weight products", 0.0)
    return {"graphs": str(graphs), "graph": graph, "past": past, "new": new, "total_ms": total,
            "ms": dict(sorted(middle.items(), key=lambda kv: -kv[1])), "weight_products_share": products / total,
            "bound_if_products_were_free": total / (total - products)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("graphs", nargs="+")
    p.add_argument("--past", type=int, default=8192)
    p.add_argument("--new", type=int, default=740)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    for graphs in args.graphs:
        r = profile(Path(graphs), args.past, args.new, args.runs, args.threads)
        print(f"{r['graphs']} ({r['graph']}.onnx, {r['new']} tokens onto {r['past']}): {r['total_ms']:.0f} ms; "
              f"weight products {r['weight_products_share']:.0%}, so at most "
              f"{r['bound_if_products_were_free']:.2f}x faster if they cost nothing")
        for op, ms in r["ms"].items():
            print(f"  {op:24} {ms:9.1f} ms  {ms / r['total_ms']:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
