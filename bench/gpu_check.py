"""The GPU check (scripts/gpu_check.sh runs it): the real 4B widths with a few layers and random weights, exported
in fp32, fp16, int4 (4-bit MatMulNBits weights, fp32 activations) and int4-fp16 (the same with fp16 activations,
the configuration GPUs run), streamed on the GPU provider with static shapes and the
device-resident cache.

    python -m bench.gpu_check --provider cuda|migraphx [--seconds 8]

Prints which nodes ran on which provider (no CPU fallback expected), ms per decode token, ms per 1-s chunk
prefill, vision ms per chunk, peak device memory, each one's agreement with fp32, and the int4 graphs' decode
speed-up over fp16 (where MatMulNBits runs, and whether 4-bit weights pay off on a GPU); writes them to
gpu_check.json.
"""

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.commentator import Commentator, StreamConfig
from runtime.providers import choose, provider_options
from runtime.sample import write_clip

from . import measure
from .e2e import GREEDY, _chunks
from .models import build_exports
from .streams import decode_rows


class DeviceMemory:
    """Peak device memory in use, polled from nvidia-smi or rocm-smi while the check runs."""

    def __init__(self):
        self.peak_mib, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _read(self) -> float:
        if shutil.which("nvidia-smi"):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            return float(out.split()[0]) if out.strip() else 0.0
        if shutil.which("rocm-smi"):
            out = json.loads(subprocess.run(["rocm-smi", "--showmeminfo", "vram", "--json"], capture_output=True,
                                            text=True).stdout or "{}")
            used = [int(v) for card in out.values() for k, v in card.items() if "Used" in k]
            return max(used, default=0) / 2**20
        return 0.0

    def _poll(self):
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self._read())
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def node_placement(m, providers, options, capacity: int, new: int) -> dict:
    """Which provider ran each node of one step of `new` tokens of model `m` (from ONNX Runtime's profiler)."""
    session_options = ort.SessionOptions()
    session_options.enable_profiling = True
    profile_dir = tempfile.mkdtemp()
    graph = m.step_graph(new)
    session_options.profile_file_prefix = str(Path(profile_dir) / graph)
    for name, value in {"batch": 1, "past": capacity, "new": new}.items():
        session_options.add_free_dimension_override_by_name(name, value)
    path = m.manifest.path(f"{graph}.onnx")
    session = ort.InferenceSession(str(path), session_options, providers=providers,
                                   provider_options=[options if p == providers[0] else {} for p in providers])
    feeds = measure.step_feeds(m, capacity, new)
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    shutil.rmtree(profile_dir)
    counts = Counter(e["args"].get("provider", "?") for e in events
                     if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    return dict(counts)


def stream(model, clip: Path, seconds: int) -> tuple[list, dict]:
    commentator = Commentator(model, StreamConfig(sampling=GREEDY, static=True))
    replies = [commentator.step(chunk) for chunk in _chunks(model, clip, seconds)]
    later = replies[1:] or replies  # the first chunk also compiles; report the steady state
    cap = commentator.config.max_new_tokens
    tokens = sum(len(r.tokens) - (len(r.tokens) == cap) for r in later)  # fed now: a capped reply's last waits
    return replies, {
        "vision_ms_per_chunk": 1e3 * np.mean([r.seconds["vision"] for r in later]),
        "prefill_ms_per_chunk": 1e3 * np.mean([r.seconds["prefill"] for r in later]),
        "decode_ms_per_token": 1e3 * sum(r.seconds["decode"] for r in later) / max(tokens, 1),
        "first_chunk_s": sum(replies[0].seconds.values()), "cache_tokens": replies[-1].cache_tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check")
    p.add_argument("--provider", default="auto")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--dtypes", default="fp32,fp16,int4,int4-fp16",
                   help="fp16 on the CPU provider needs fp32 copies per session; int4: 4-bit weights, fp32 "
                        "activations; int4-fp16: 4-bit weights, fp16 activations")
    args = p.parse_args(argv)
    providers = choose(args.provider)
    options = provider_options(providers[0])
    started = time.perf_counter()
    clip = write_clip(Path("build/bench") / "clip-720p.mp4", args.seconds, 1280, 720, fps=25)
    report = {"provider": providers[0], "device": subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else ""}
    replies, dtypes = {}, args.dtypes.split(",")
    for dtype in dtypes:
        # int4: the fp32 export's weights in 4 bits (MatMulNBits), activations and cache fp32; int4-fp16: the fp16's
        exports = build_exports(Path("build/bench"), dtype={"int4": "fp32", "int4-fp16": "fp16"}.get(dtype, dtype))
        wide = exports["wide_int4" if dtype.startswith("int4") else "wide"]
        model = wide.model(providers=providers, options=options)  # one model: its sessions share weights
        with DeviceMemory() as memory:  # the stream alone: compiled programs, weights, cache, activations
            replies[dtype], report[dtype] = stream(model, clip, args.seconds)
        report[dtype]["peak_device_memory_mib"] = memory.peak_mib
        report[dtype]["decode_ms_by_cache"] = {n: measure.static_step_ms(model, n) for n in (1024, 4096, 16384)}
        # the server's batched decode step at each batch size (4k cached tokens per row), and the bytes MIGraphX's
        # in-place ScatterND copies per step (the rows' whole caches onto themselves; ONNX Runtime's CUDA kernel
        # skips the copy when input and output alias)
        rows = decode_rows(model, cached=(4096,), rounds=3, static=True)[4096]
        slots = 4096 + 64 + 1  # decode_rows' capacity and the scratch slot
        per_row = 3 * model.layers * model.kv_heads * model.head_dim * np.dtype(model.cache_dtype).itemsize * slots
        report[dtype]["batched_decode_4k"] = {b: {**r, "scatter_copy_bytes_if_migraphx": b * 2 * per_row}
                                              for b, r in rows.items()}
        report[dtype]["nodes_by_provider"] = {graph: node_placement(model, providers, options, 4096, new)
                                              for graph, new in (("decoder", 1), ("prefill", 64))}
        report["setup"] = {**wide.describe(), "frame": [1280, 720], "seconds": args.seconds}
        del model
    for other in ("fp16", "int4", "int4-fp16"):
        if "fp32" not in replies or other not in replies:
            continue
        pairs = list(zip(replies["fp32"], replies[other]))
        report[f"{other}_vs_fp32"] = {
            "first_chunk_max_logit_error": float(np.abs(pairs[0][0].logits - pairs[0][1].logits).max()),
            "first_chunk_top1_equal": bool(pairs[0][0].logits.argmax() == pairs[0][1].logits.argmax()),
            "chunks_with_identical_text": sum(a.tokens == b.tokens for a, b in pairs), "chunks": len(pairs)}
    for int4 in ("int4", "int4-fp16"):  # the question a GPU user asks: are 4-bit weights faster than fp16 there?
        if int4 in report and "fp16" in report:
            report[f"{int4}_vs_fp16_decode_speedup"] = {n: report["fp16"]["decode_ms_by_cache"][n] / ms
                                                        for n, ms in report[int4]["decode_ms_by_cache"].items()}
    report["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(report, indent=1, default=float) + "\n")
    for dtype in dtypes:
        r = report[dtype]
        print(f"{dtype}: nodes {r['nodes_by_provider']}; decode {r['decode_ms_per_token']:.1f} ms/token, "
              f"prefill {r['prefill_ms_per_chunk']:.0f} ms/chunk, vision {r['vision_ms_per_chunk']:.0f} ms/chunk, "
              f"decode step by cache {r['decode_ms_by_cache']}, peak device memory {r['peak_device_memory_mib']:.0f} MiB")
    for other in ("fp16", "int4", "int4-fp16"):
        print(f"{other} vs fp32 {report.get(f'{other}_vs_fp32')}; decode speed-up over fp16 "
              f"{report.get(f'{other}_vs_fp16_decode_speedup', '-')}")
    print(f"{report['seconds']:.0f} s")
    fallback = providers[0] != "CPUExecutionProvider" and any(
        nodes.get("CPUExecutionProvider", 0) for d in dtypes for nodes in report[d]["nodes_by_provider"].values())
    return 1 if fallback else 0


if __name__ == "__main__":
    raise SystemExit(main())
