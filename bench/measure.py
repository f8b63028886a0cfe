"""Timings of one decoder step, one chunk prefill and one vision call, for ONNX Runtime and for transformers.

Each number is the median of several runs after a warm-up, on the same random inputs for both sides. These
functions are shared by `make bench` and the GPU check script.
"""

import statistics
import time

import numpy as np

from runtime.model import Model


def median_ms(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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


def onnx_step_ms(model: Model, past: int, new: int, repeat: int = 5, static: bool = False) -> float:
    """One decoder call over `new` tokens onto `past` cached tokens (static: a session fixed to these shapes)."""
    feeds = step_feeds(model, past, new)
    session = model.session(model.step_graph(new), {"batch": 1, "past": past, "new": new} if static else None)
    return median_ms(lambda: session.run(["logits"], feeds), repeat)


def torch_step_ms(hf_model, past: int, new: int, repeat: int = 5) -> float:
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

    return median_ms(step, repeat)


def static_step_ms(model: Model, capacity: int, repeat: int = 5) -> float:
    """A decode step the way the static runtime takes it: device-resident cache of `capacity` slots, IO binding,
    the new K/V scattered in place."""
    from runtime.engine import StaticEngine

    engine = StaticEngine(model, capacity, prefill=1)
    embeds = np.zeros((1, model.hidden), np.float32)
    deepstack = np.zeros((model.n_deepstack, 1, model.hidden), np.float32)
    position, slot = np.full((3, 1), capacity, np.int64), engine.pool.allocate(1)
    return median_ms(lambda: engine.run(embeds, deepstack, position, slot), repeat)


def onnx_vision_ms(model: Model, grid_h: int, grid_w: int, frames: int = 1, repeat: int = 3,
                   static: bool = False) -> float:
    rng = np.random.default_rng(0)
    row = model.manifest["vision"]["in_channels"] * model.manifest["vision"]["temporal_patch_size"] \
        * model.manifest["vision"]["patch_size"] ** 2
    patches = rng.standard_normal((frames, grid_h * grid_w, row), dtype=np.float32)
    return median_ms(lambda: model.encode_video(patches, grid_h, grid_w, static), repeat)


def torch_vision_ms(hf_model, grid_h: int, grid_w: int, frames: int = 1, repeat: int = 3) -> float:
    import torch

    cfg = hf_model.config.vision_config
    row = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    torch.manual_seed(0)
    pixels = torch.randn(frames * grid_h * grid_w, row)
    grid = torch.tensor([[frames, grid_h, grid_w]])

    def run():
        with torch.no_grad():
            hf_model.model.visual(pixels, grid)

    return median_ms(run, repeat)


def copy_bandwidth_gbs(megabytes: int = 512, repeat: int = 5) -> float:
    """This machine's memory copy bandwidth (bytes read + written per second), the floor's denominator."""
    src = np.ones(megabytes * 2**20, np.uint8)
    dst = np.empty_like(src)
    ms = median_ms(lambda: np.copyto(dst, src), repeat)
    return 2 * src.nbytes / (ms / 1e3) / 1e9


def _matmul_session(m: int, k: int, n: int, threads: int):
    """One MatMul with both operands as inputs (so, like the runtime's shared weights, never prepacked)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def read_bandwidth_gbs(threads: int, megabytes: int = 512, repeat: int = 5) -> float:
    """Streaming read bandwidth as a decode step sees it: a 1 x 4096 by 4096 x N fp32 product (the GEMV kernel
    every weight of a decode step goes through) over a matrix far larger than the caches."""
    k = 4096
    n = megabytes * 2**20 // (4 * k)
    session = _matmul_session(1, k, n, threads)
    feeds = {"a": np.ones((1, k), np.float32), "b": np.ones((k, n), np.float32)}
    ms = median_ms(lambda: session.run(None, feeds), repeat)
    return feeds["b"].nbytes / (ms / 1e3) / 1e9


def gemm_gflops(threads: int, m: int = 740, k: int = 2560, n: int = 9728, repeat: int = 3) -> float:
    """fp32 matrix-product throughput at a prefill's shape (a chunk times the 4B FFN's up projection)."""
    session = _matmul_session(m, k, n, threads)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((m, k), dtype=np.float32), "b": rng.standard_normal((k, n), dtype=np.float32)}
    ms = median_ms(lambda: session.run(None, feeds), repeat)
    return 2 * m * k * n / (ms / 1e3) / 1e9


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
