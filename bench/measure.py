"""Timings of one decoder step, one chunk prefill and one vision call, for ONNX Runtime and for transformers, and
probes of what the machine allows (read bandwidth, matrix-product rate).

The callables (`onnx_step`, `torch_step`, ...) are timed in turn by `rounds`, so that the machine's drift (2x
between runs on these virtual machines, and within a run) hits every side alike; each figure is a median over
rounds, and each ratio (`ratio`) the median of the per-round ratios with its range. These functions are shared by
`make bench` and the GPU check script.
"""

import statistics
import time

import numpy as np

from runtime.model import Model


def call_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median_ms(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(call_ms(fn) for _ in range(repeat))


class SelfTimed:
    """A side that times itself and returns its ms (llama.cpp in its child process: the pipe's round trip between
    the processes is not llama.cpp's time)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self) -> float:
        return self.fn()


def rounds(sides: dict, count: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """{name: callable} timed in turn (a, b, c, a, b, c, ...), `count` rounds after `warmup`: {name: [ms]}."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times = {name: [] for name in sides}
    for _ in range(count):
        for name, fn in sides.items():
            times[name].append(fn() if isinstance(fn, SelfTimed) else call_ms(fn))
    return times


def ratio(slow: list[float], fast: list[float]) -> dict:
    """How many times faster `fast` ran than `slow`, round by round: the median and the range."""
    r = [a / b for a, b in zip(slow, fast)]
    return {"median": statistics.median(r), "range": [min(r), max(r)]}


def step_feeds(model: Model, past: int, new: int, batch: int = 1) -> dict:
    """Random inputs of one decoder call over `new` tokens onto `past` cached tokens in each of `batch` rows, every
    slot attended."""
    rng = np.random.default_rng(0)
    shape = (batch, model.kv_heads, past, model.head_dim)
    feeds = {"inputs_embeds": rng.standard_normal((batch, new, model.hidden), dtype=np.float32).astype(
                 model.float_dtype),
             "deepstack_embeds": np.zeros((model.n_deepstack, batch, new, model.hidden), model.float_dtype),
             "position_ids": np.tile(np.arange(past, past + new), (3, batch, 1)),
             "past_mask": np.ones((batch, past), np.int64), "new_mask": np.ones((batch, new), np.int64)}
    for i in range(model.layers):
        for part in ("key", "value"):
            feeds[f"past_{part}.{i}"] = rng.standard_normal(shape, dtype=np.float32).astype(model.cache_dtype)
    return feeds


def onnx_step(model: Model, past: int, new: int, static: bool = False):
    """One decoder call over `new` tokens onto `past` cached tokens (static: a session fixed to these shapes)."""
    feeds = step_feeds(model, past, new)
    session = model.session(model.step_graph(new), {"batch": 1, "past": past, "new": new} if static else None)
    return lambda: session.run(["logits"], feeds)


def torch_step(hf_model, past: int, new: int):
    """The transformers step the way generate() takes it: sdpa attention, a DynamicCache that grows by `new`."""
    import torch
    from transformers import DynamicCache

    cfg = hf_model.config.text_config
    torch.manual_seed(0)
    shape = (1, cfg.num_key_value_heads, past, cfg.head_dim)
    keys = [torch.randn(shape) for _ in range(cfg.num_hidden_layers)]
    values = [torch.randn(shape) for _ in range(cfg.num_hidden_layers)]
    embeds = torch.randn(1, new, cfg.hidden_size)
    positions = torch.arange(past, past + new).view(1, 1, -1).expand(3, 1, -1)
    mask = torch.ones(1, past + new, dtype=torch.long)

    def step():
        cache = DynamicCache(config=cfg)
        for i in range(cfg.num_hidden_layers):  # a fresh cache each time; its update (a concat) is the real cost
            cache.update(keys[i], values[i], i)
        with torch.no_grad():
            hf_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True,
                     logits_to_keep=1)

    return step


def static_step_ms(model: Model, capacity: int, repeat: int = 5) -> float:
    """A decode step the way the static runtime takes it: device-resident cache of `capacity` slots, IO binding,
    the new K/V scattered in place."""
    from runtime.engine import StaticEngine

    engine = StaticEngine(model, capacity, prefill=1)
    embeds = np.zeros((1, model.hidden), np.float32)
    deepstack = np.zeros((model.n_deepstack, 1, model.hidden), np.float32)
    position, slot = np.full((3, 1), capacity, np.int64), engine.pool.allocate(1)
    return median_ms(lambda: engine.run(embeds, deepstack, position, slot), repeat)


def onnx_vision(model: Model, grid_h: int, grid_w: int, frames: int = 1, static: bool = False):
    rng = np.random.default_rng(0)
    row = model.manifest["vision"]["in_channels"] * model.manifest["vision"]["temporal_patch_size"] \
        * model.manifest["vision"]["patch_size"] ** 2
    patches = rng.standard_normal((frames, grid_h * grid_w, row), dtype=np.float32)
    return lambda: model.encode_video(patches, grid_h, grid_w, static)


def torch_vision(hf_model, grid_h: int, grid_w: int, frames: int = 1):
    import torch

    cfg = hf_model.config.vision_config
    row = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    torch.manual_seed(0)
    pixels = torch.randn(frames * grid_h * grid_w, row)
    grid = torch.tensor([[frames, grid_h, grid_w]])

    def run():
        with torch.no_grad():
            hf_model.model.visual(pixels, grid)

    return run


def _session(node, inputs: dict, threads: int, initializers=()):
    """One node as an ONNX Runtime session with the runtime's settings; `inputs` {name: (dtype, shape)}."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    types = {np.float32: TensorProto.FLOAT, np.uint8: TensorProto.UINT8}
    graph = helper.make_graph([node], "probe",
                              [helper.make_tensor_value_info(name, types[t], shape)
                               for name, (t, shape) in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _best_ms(fn, repeat: int) -> float:
    """The fastest of `repeat` calls after a warm-up: a probe wants what the machine can do, not its usual."""
    fn()
    return min(call_ms(fn) for _ in range(repeat))


def read_gbs(threads: int, megabytes: int = 512, repeat: int = 20, block: int = 128) -> dict[str, float]:
    """Streaming read bandwidth (GB/s) by three methods, each over data far larger than the caches and the best of
    `repeat` calls: "gemv", ONNX Runtime's fp32 1 x 4096 by 4096 x N product with the matrix as an input (never
    prepacked: the kernel every fp32 weight of a decode step goes through); "int4_gemv", its MatMulNBits (4 bits,
    block `block`, accuracy_level 4, prepacked: the int4 decode's kernel), counting packed codes and scales; "numpy",
    numpy summing a float32 array on one core (no ONNX Runtime at all). Many calls, because this virtual machine's
    bandwidth moves from call to call (24 to 41 GB/s over 4 s of back-to-back GEMVs here), and a floor wants its
    peak."""
    from onnx import helper, numpy_helper

    k, size = 4096, megabytes * 2**20
    out = {}
    matrix = np.ones((k, size // (4 * k)), np.float32)
    gemv = _session(helper.make_node("MatMul", ["a", "b"], ["y"]),
                    {"a": (np.float32, [1, k]), "b": (np.float32, list(matrix.shape))}, threads)
    feeds = {"a": np.ones((1, k), np.float32), "b": matrix}
    out["gemv"] = matrix.nbytes / _best_ms(lambda: gemv.run(None, feeds), repeat) / 1e6
    del gemv, feeds, matrix
    n = size // (k // 2 + k // block * 4)  # columns: 4-bit codes and one fp32 scale per block
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    scales = np.full((n, k // block), 0.01, np.float32)
    int4 = _session(helper.make_node("MatMulNBits", ["a", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n,
                                     bits=4, block_size=block, accuracy_level=4),
                    {"a": (np.float32, [1, k])}, threads,
                    [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "scales")])
    a = {"a": np.ones((1, k), np.float32)}
    out["int4_gemv"] = (codes.nbytes + scales.nbytes) / _best_ms(lambda: int4.run(None, a), repeat) / 1e6
    del int4, codes
    flat = np.ones(size // 4, np.float32)
    out["numpy"] = flat.nbytes / _best_ms(flat.sum, repeat) / 1e6
    return out


def gemm_gflops(threads: int, m: int = 740, k: int = 2560, n: int = 9728, repeat: int = 3) -> float:
    """fp32 matrix-product throughput at a prefill's shape (a chunk times the 4B FFN's up projection), the best of
    `repeat` calls."""
    from onnx import helper

    session = _session(helper.make_node("MatMul", ["a", "b"], ["y"]),
                       {"a": (np.float32, [m, k]), "b": (np.float32, [k, n])}, threads)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((m, k), dtype=np.float32), "b": rng.standard_normal((k, n), dtype=np.float32)}
    return 2 * m * k * n / _best_ms(lambda: session.run(None, feeds), repeat) / 1e6


class Floors:
    """The best read bandwidth and matrix-product rate this machine showed in a run, probed at several points of it
    (before and after the timed sections): a floor divides by the best figure seen, so no honest step can beat it.
    A run whose first and last probes disagree by more than NOISY is flagged as noisy."""

    NOISY = 0.15

    def __init__(self, threads: int, quick: bool):
        self.threads, self.quick, self.probes = threads, quick, []

    def probe(self, when: str) -> None:
        read = read_gbs(self.threads, 64 if self.quick else 512)
        gemm = gemm_gflops(self.threads, *((64, 256, 256) if self.quick else ()))
        self.probes.append({"when": when, "read_gbs": read, "gemm_gflops": gemm})
        print(f"probe ({when}): read {', '.join(f'{k} {v:.1f}' for k, v in read.items())} GB/s; "
              f"fp32 products {gemm:.0f} GFLOP/s", flush=True)

    @property
    def read(self) -> float:
        return max(max(p["read_gbs"].values()) for p in self.probes)

    @property
    def gemm(self) -> float:
        return max(p["gemm_gflops"] for p in self.probes)

    def drift(self) -> dict:
        """Relative difference of the first and the last probe's best figures."""
        first, last = self.probes[0], self.probes[-1]
        pairs = {"read": (max(first["read_gbs"].values()), max(last["read_gbs"].values())),
                 "gemm": (first["gemm_gflops"], last["gemm_gflops"])}
        return {k: abs(a - b) / max(a, b) for k, (a, b) in pairs.items()}

    def report(self) -> dict:
        drift = self.drift()
        best = max(((v, k) for p in self.probes for k, v in p["read_gbs"].items()))
        return {"probes": self.probes, "read_gbs": self.read, "read_method": best[1], "gemm_gflops": self.gemm,
                "drift": drift, "noisy": any(v > self.NOISY for v in drift.values())}


def decoder_flops(model: Model, past: int, new: int) -> int:
    """Multiply-adds x 2 of one decoder call: the layers' weight products for every new token, attention of every
    new token over past + new keys (QK and PV), and the LM head at the last position only."""
    text = model.manifest["text"]
    hidden, heads, ffn = text["hidden_size"], text["num_attention_heads"], \
        model.manifest["config"]["text_config"]["intermediate_size"]
    attn_width, kv_width = heads * model.head_dim, model.kv_heads * model.head_dim
    per_token = hidden * (2 * attn_width + 2 * kv_width) + 3 * hidden * ffn
    attention = 2 * heads * new * (past + new) * model.head_dim
    return 2 * (model.layers * (new * per_token + attention) + hidden * text["vocab_size"])


def vision_flops(model: Model, grid_h: int, grid_w: int, frames: int = 1) -> int:
    """Multiply-adds x 2 of one vision call: the patch embedding, each block's weight products for every patch and
    its attention within each temporal patch (QK and PV), and the mergers (the final one and one per DeepStack
    layer) over the merged tokens."""
    vision = model.manifest["vision"]
    width, ffn = vision["hidden_size"], model.manifest["config"]["vision_config"]["intermediate_size"]
    row = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    per_frame = grid_h * grid_w
    tokens, merged = frames * per_frame, width * vision["spatial_merge_size"] ** 2
    block = tokens * (4 * width * width + 2 * width * ffn) + 2 * frames * per_frame ** 2 * width
    mergers = (1 + len(vision["deepstack_visual_indexes"])) * tokens // vision["spatial_merge_size"] ** 2 \
        * merged * (merged + vision["out_hidden_size"])
    return 2 * (tokens * row * width + vision["depth"] * block + mergers)


def decoder_bytes(model: Model, past: int) -> int:
    """Bytes one decode step must read at least: every weight of the decoder graph and the whole cache."""
    weights = sum(int(np.prod(w["shape"])) * (0.5 if w["dtype"] == "int4" else np.dtype(w["dtype"]).itemsize)
                  for w in model.manifest["graphs"]["decoder"].get("external_weights", []))
    cache = 2 * model.layers * model.kv_heads * past * model.head_dim * np.dtype(model.cache_dtype).itemsize
    return int(weights) + cache


RESIDENT = """
import json, sys
from bench.measure import step_feeds
from runtime.manifest import Manifest
from runtime.model import Model
model = Model(Manifest.load(sys.argv[1]), threads=int(sys.argv[2]))
for new in (1, 8):  # both decoder graphs loaded and run once, as a stream has them
    feeds = step_feeds(model, 256, new)
    model.session(model.step_graph(new)).run(["logits"], feeds)
print(json.dumps({"rss_mib": int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20}))
"""


def resident_mib(graphs, threads: int) -> dict:
    """Resident memory of a fresh process holding both decoder sessions after one step each (weights as the runtime
    loads them: memory-mapped and shared for fp32, one prepacked copy per session for int4). Current, not peak:
    Linux carries the parent's peak (ru_maxrss) across fork and exec."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", RESIDENT, str(graphs), str(threads)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
