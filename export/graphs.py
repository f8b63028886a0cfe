"""Trace the vision encoder and the decoder step to ONNX with `torch.onnx.export(dynamo=True)`.

Opset 18 on purpose: newer opsets turn GELU, RMSNorm and attention into single ops (`Gelu`, `RMSNormalization`,
`Attention`) that MIGraphX either lacks or parses as the com.microsoft op of the same name with other semantics.
"""

import gc
import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.export import Dim

from .decoder import DecoderStep
from .vision import VisionEncoder

OPSET = 18
# Weights always go to `<graph>.onnx.data` (ONNX external data): protobuf caps a file at 2 GB, and the runtime
# memory-maps the file to share one copy of the weights between the sessions of a graph.


def decoder_names(layers: int) -> tuple[list[str], list[str]]:
    inputs = ["inputs_embeds", "deepstack_embeds", "position_ids", "past_mask", "new_mask"]
    inputs += [f"past_key.{i}" for i in range(layers)] + [f"past_value.{i}" for i in range(layers)]
    outputs = ["logits"] + [f"new_key.{i}" for i in range(layers)] + [f"new_value.{i}" for i in range(layers)]
    outputs += [f"new_key_raw.{i}" for i in range(layers)]
    return inputs, outputs


VISION_INPUTS = ["patches", "pos_taps", "pos_weights", "rotary_pos"]
VISION_OUTPUTS = ["embeds", "deepstack"]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def to_fp16(model) -> None:
    """fp16 weights with fp32 islands: norms keep fp32 weights (the wrappers run them in fp32, as RoPE and
    softmax). Build the wrappers first: they keep fp32 copies of the rotary frequencies."""
    model.half()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            module.float()


def export_vision(encoder: VisionEncoder, config, dtype: str, path: Path, metadata: dict) -> None:
    cfg, f = config.vision_config, DTYPES[dtype]
    merge = cfg.spatial_merge_size
    frames, patches = 2, 4 * merge * merge  # sample sizes only: both dims are symbolic in the graph
    row = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    args = (torch.randn(frames, patches, row, dtype=f), torch.zeros(patches, 4, dtype=torch.long),
            torch.full((patches, 4), 0.25, dtype=f), torch.zeros(patches, 2, dtype=torch.long))
    t, p = Dim("frames"), Dim("patches")
    _export(encoder, args, path, VISION_INPUTS, VISION_OUTPUTS,
            ({0: t, 1: p}, {0: p}, {0: p}, {0: p}), metadata, {"((patches*frames)//4)": "tokens"})


def export_decoder(step: DecoderStep, config, dtype: str, path: Path, metadata: dict,
                   shared: dict | None = None) -> dict:
    """The decoder step as `path`. Every weight found in `shared` (what an earlier export returned) is referenced
    in that graph's data file instead of written again. Returns the same kind of table for this graph."""
    cfg, f = config.text_config, DTYPES[dtype]
    layers, kv, hd, hidden = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    batch, new, past = 2, 3, 5  # sample sizes only (>= 2, so that the tracer keeps the dims symbolic)
    n_deepstack = len(config.vision_config.deepstack_visual_indexes)
    args = (torch.randn(batch, new, hidden, dtype=f), torch.zeros(n_deepstack, batch, new, hidden, dtype=f),
            torch.zeros(3, batch, new, dtype=torch.long), torch.ones(batch, past, dtype=torch.long),
            torch.ones(batch, new, dtype=torch.long),
            [torch.randn(batch, kv, past, hd, dtype=f) for _ in range(layers)],
            [torch.randn(batch, kv, past, hd, dtype=f) for _ in range(layers)])
    b, s, t = Dim("batch"), Dim("new"), Dim("past")
    cache = [{0: b, 2: t}] * layers
    inputs, outputs = decoder_names(layers)
    return _export(step, args, path, inputs, outputs,
                   ({0: b, 1: s}, {1: b, 2: s}, {1: b, 2: s}, {0: b, 1: t}, {0: b, 1: s}, cache, cache), metadata, {},
                   shared)


def _content(value) -> tuple:
    """What makes two initializers the same tensor. By content, not name: the exporter folds each Linear weight
    into a transposed constant named after its position in the trace (`val_93`), which differs between graphs."""
    array = np.ascontiguousarray(value.const_value.numpy())
    return value.dtype.value, array.shape, hashlib.blake2b(array.data, digest_size=16).hexdigest()


def _export(module, args, path, inputs, outputs, dynamic_shapes, metadata, rename, shared=None) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" and friends
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=OPSET,
                                    optimize=True, verbose=False)
    contents = {name: _content(value) for name, value in program.model.graph.initializers.items()
                if value.const_value is not None}
    linked = []
    for name, content in contents.items():
        if content in (shared or {}):  # stored once, in the other graph's data file
            tensor = onnx.TensorProto()
            tensor.CopyFrom(shared[content])
            tensor.name = name
            linked.append(tensor)
            del program.model.graph.initializers[name]
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    program.save(str(path), external_data=True)
    # Stamp the metadata and dim names into the graph proto; the weights (maybe external) stay where they are.
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer.extend(linked)
    _name_dims(model, rename)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=str(value))
    onnx.save_model(model, str(path))
    data = path.with_name(path.name + ".data")
    if data.is_file() and not data.stat().st_size:  # every weight was shared
        data.unlink()
    del program
    _release_rewriter_state()
    return {contents[t.name]: t for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL and t.name in contents}


def _release_rewriter_state() -> None:
    """onnxscript's module-level rewrite rules keep the last graph they matched (`_graph`, `_current_node`,
    `_match`), and with it every weight of the last trace: the whole 4B model (16 GB) outlived its `del`, and the
    ONNX sessions that verify it then read their memory-mapped weights from disk. Drop those references."""
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to release
        return
    for obj in gc.get_objects():
        if PatternMatcher in type(obj).__mro__:  # not isinstance: abc checks on every object warn about torch's
            for name in ("_graph", "_current_node", "_match", "_tracer"):
                if name in vars(obj):
                    setattr(obj, name, None)


def _name_dims(model: onnx.ModelProto, rename: dict) -> None:
    """Give symbolic dims the tracer named after an expression a readable name (`tokens` for vision outputs)."""
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
