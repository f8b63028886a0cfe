"""Two small graphs that keep the KV cache on the device, written with onnx.helper for exact control of the ops.

- `cache_write.onnx`: scatters a step's new keys (after and before RoPE), values and mask bits into their cache
  slots (`slots` i64 [new], `new_mask` i64 [new]). The runtime binds each `*_out` output to the same device buffer as its input: ONNX Runtime's ScatterND
  skips its copy when input and output alias, so a step writes only the new tokens' bytes.
- `cache_rope.onnx`: rotates every slot's pre-RoPE key to the slot's position (after an eviction moved them),
  writing the post-RoPE cache the decoder reads. Same math and float32 ops as the decoder's RoPE.

Both have static shapes once the runtime fixes `past` (the cache capacity) and `new`.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graphs import OPSET

FLOAT = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


def _cache_io(name, elem, kv, hd, length):
    return helper.make_tensor_value_info(name, elem, [1, kv, length, hd])


def cache_write(layers: int, kv: int, hd: int, dtype: str, path: Path) -> None:
    elem = FLOAT[dtype]
    nodes, inputs, outputs = [], [helper.make_tensor_value_info("slots", TensorProto.INT64, ["new"])], []
    inits = [numpy_helper.from_array(np.arange(kv, dtype=np.int64).reshape(1, kv, 1, 1), "heads"),
             numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.int64), "zero"),
             numpy_helper.from_array(np.array([1, kv], np.int64), "lead"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([0, 1, 3], np.int64), "axes_013"),
             numpy_helper.from_array(np.array([1], np.int64), "axis_1")]
    # index [1, kv, S, 3] = (0, head, slot) for every (head, new token): ScatterND writes whole head_dim rows
    nodes += [helper.make_node("Shape", ["slots"], ["s"]),
              helper.make_node("Concat", ["lead", "s", "one"], ["index_shape"], axis=0),
              helper.make_node("Unsqueeze", ["slots", "axes_013"], ["slot_4d"]),  # [1, 1, S, 1]
              helper.make_node("Expand", ["zero", "index_shape"], ["i0"]),
              helper.make_node("Expand", ["heads", "index_shape"], ["i1"]),
              helper.make_node("Expand", ["slot_4d", "index_shape"], ["i2"]),
              helper.make_node("Concat", ["i0", "i1", "i2"], ["index"], axis=3)]
    for i in range(layers):
        for part in ("key", "key_raw", "value"):
            inputs += [_cache_io(f"{part}.{i}", elem, kv, hd, "past"), _cache_io(f"new_{part}.{i}", elem, kv, hd, "new")]
            outputs.append(_cache_io(f"{part}_out.{i}", elem, kv, hd, "past"))
            nodes.append(helper.make_node("ScatterND", [f"{part}.{i}", "index", f"new_{part}.{i}"],
                                          [f"{part}_out.{i}"]))
    # the past mask takes `new_mask` at the written slots (index [S, 2] = (0, slot)): 1 for real tokens, 0 for
    # padding, whose K/V all land in one scratch slot that must stay unattended
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, [1, "past"]))
    inputs.append(helper.make_tensor_value_info("new_mask", TensorProto.INT64, ["new"]))
    outputs.append(helper.make_tensor_value_info("mask_out", TensorProto.INT64, [1, "past"]))
    nodes += [helper.make_node("Unsqueeze", ["slots", "axis_1"], ["slot_rows"]),  # [S, 1]
              helper.make_node("Mul", ["slot_rows", "zero_1"], ["batch_rows"]),
              helper.make_node("Concat", ["batch_rows", "slot_rows"], ["mask_index"], axis=1),
              helper.make_node("ScatterND", ["mask", "mask_index", "new_mask"], ["mask_out"])]
    inits.append(numpy_helper.from_array(np.zeros((1,), np.int64), "zero_1"))
    _save(helper.make_graph(nodes, "cache_write", inputs, outputs, inits), path)


def cache_rope(layers: int, kv: int, hd: int, dtype: str, inv_freq, channel_axis, path: Path) -> None:
    """key.i = key_raw.i * cos + rotate_half(key_raw.i) * sin at each slot's position; `positions` i64 [3, past].
    `channel_axis` [3, hd/2] is the interleaved MRoPE one-hot the decoder uses."""
    elem = FLOAT[dtype]
    inits = [numpy_helper.from_array(np.asarray(inv_freq, np.float32), "inv_freq"),
             numpy_helper.from_array(np.asarray(channel_axis, np.float32)[:, None, :], "channel_axis"),
             numpy_helper.from_array(np.array([0], np.int64), "axis_0"),
             numpy_helper.from_array(np.array([hd // 2, hd // 2], np.int64), "halves")]
    nodes = [helper.make_node("Cast", ["positions"], ["pos_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["pos_f", "axis_last"], ["pos_3d"]),  # [3, past, 1]
             helper.make_node("Mul", ["pos_3d", "channel_axis"], ["pos_sel"]),  # [3, past, hd/2]
             helper.make_node("ReduceSum", ["pos_sel", "axis_0"], ["pos_ch"], keepdims=0),  # [past, hd/2]
             helper.make_node("Mul", ["pos_ch", "inv_freq"], ["angles_half"]),
             helper.make_node("Concat", ["angles_half", "angles_half"], ["angles"], axis=-1),  # [past, hd]
             helper.make_node("Cos", ["angles"], ["cos"]),
             helper.make_node("Sin", ["angles"], ["sin"])]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axis_last"))
    inputs = [helper.make_tensor_value_info("positions", TensorProto.INT64, [3, "past"])]
    outputs = []
    for i in range(layers):
        raw, k = f"key_raw.{i}", f"key.{i}"
        inputs.append(_cache_io(raw, elem, kv, hd, "past"))
        outputs.append(_cache_io(k, elem, kv, hd, "past"))
        source = raw
        if dtype == "fp16":  # rotate in float32, as the decoder does
            nodes.append(helper.make_node("Cast", [raw], [f"{raw}_f"], to=TensorProto.FLOAT))
            source = f"{raw}_f"
        nodes += [helper.make_node("Split", [source, "halves"], [f"x1.{i}", f"x2.{i}"], axis=-1),
                  helper.make_node("Neg", [f"x2.{i}"], [f"nx2.{i}"]),
                  helper.make_node("Concat", [f"nx2.{i}", f"x1.{i}"], [f"rot.{i}"], axis=-1),
                  helper.make_node("Mul", [source, "cos"], [f"kc.{i}"]),
                  helper.make_node("Mul", [f"rot.{i}", "sin"], [f"ks.{i}"])]
        if dtype == "fp16":
            nodes += [helper.make_node("Add", [f"kc.{i}", f"ks.{i}"], [f"k32.{i}"]),
                      helper.make_node("Cast", [f"k32.{i}"], [k], to=TensorProto.FLOAT16)]
        else:
            nodes.append(helper.make_node("Add", [f"kc.{i}", f"ks.{i}"], [k]))
    _save(helper.make_graph(nodes, "cache_rope", inputs, outputs, inits), path)


def _save(graph, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qwen3vl-stream")
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
