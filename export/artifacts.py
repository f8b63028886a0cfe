"""Everything in `graphs/<name>/` besides the graphs: embedding table, tokenizer, and the manifest."""

import json
import platform
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from runtime.manifest import FORMAT, FORMAT_VERSION, ONNX_DTYPES, file_sha256

from .load import Source

QUANTIZED_OPS = ("MatMulNBits", "DequantizeLinear")
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# StreamingVLM bounds each frame to 100..768 merged tokens (pixels = tokens x (patch x merge)^2).
MIN_FRAME_TOKENS, MAX_FRAME_TOKENS = 100, 768
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def write_embeddings(model, out: Path) -> dict:
    """The token embedding table as a plain .npy, so the runtime memory-maps it without torch."""
    table = model.get_input_embeddings().weight.detach().numpy()  # in the export dtype
    np.save(out / "embed_tokens.npy", table)
    return {"file": "embed_tokens.npy", "dtype": str(table.dtype), "shape": list(table.shape)}


def copy_tokenizer(source: Source, out: Path) -> dict:
    folder = out / "tokenizer"
    folder.mkdir(exist_ok=True)
    for name, path in source.tokenizer_files().items():
        shutil.copyfile(path, folder / name)
    return {"dir": "tokenizer", "files": sorted(p.name for p in folder.iterdir())}


def graph_contract(path: Path) -> dict:
    """Names, dtypes and symbolic shapes of a graph's inputs and outputs, read from the saved ONNX file, and
    where each external weight lies in its data file (so the runtime can map it once for several sessions)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        return [{"name": v.name, "dtype": ONNX_DTYPES[v.type.tensor_type.elem_type],
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    contract = {"file": path.name, "inputs": describe(graph.input), "outputs": describe(graph.output)}
    weights = []
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            weights.append({"name": tensor.name, "dtype": ONNX_DTYPES[tensor.data_type], "shape": list(tensor.dims),
                            "file": info["location"], "offset": int(info.get("offset", 0))})
    if weights:
        contract["external_weights"] = weights
    ops = Counter(n.op_type for n in graph.node if n.op_type in QUANTIZED_OPS)
    if ops:  # what the runtime's load check (runtime/quant.py) reads, so that it needs no onnx
        contract["quantized"] = {"ops": dict(ops), "matmulnbits": _matmulnbits(graph)}
    return contract


def _matmulnbits(graph) -> list[dict]:
    """The distinct settings of the graph's MatMulNBits nodes."""
    types = {t.name: t.data_type for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        zero_points = node.input[3] if len(node.input) > 3 and node.input[3] else None
        kind = None if zero_points is None else "float" if types.get(zero_points) in FLOAT_TYPES else "int"
        settings = {"bits": attrs.get("bits", 4), "accuracy_level": attrs.get("accuracy_level", 0),
                    "zero_points": kind}
        if settings not in found:
            found.append(settings)
    return found


def _special_ids(out: Path, config) -> dict:
    tokenizer = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    missing = [t for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>") if t not in added]
    if missing:
        raise ValueError(f"the tokenizer lacks {missing}: not a Qwen tokenizer")
    return {"im_start": added["<|im_start|>"], "im_end": added["<|im_end|>"], "endoftext": added["<|endoftext|>"],
            "vision_start": config.vision_start_token_id, "vision_end": config.vision_end_token_id,
            "image_pad": config.image_token_id, "video_pad": config.video_token_id}


def _preprocess(source: Source, vision) -> dict:
    path = source.file("video_preprocessor_config.json")
    video = json.loads(path.read_text()) if path else {}
    unit = (vision.patch_size * vision.spatial_merge_size) ** 2
    # Per-frame bounds: the checkpoint's own when its video processor declares min_pixels and max_pixels (per frame,
    # as Qwen2-VL's video processor reads them; the built-in micro model, trained on 128x128 frames, does), else
    # StreamingVLM's. Qwen3-VL checkpoints declare only `size` (pixels summed over a whole clip), so they get
    # StreamingVLM's 100..768 merged tokens per frame.
    declared = "min_pixels" in video and "max_pixels" in video
    bounds = ((int(video["min_pixels"]), int(video["max_pixels"])) if declared
              else (MIN_FRAME_TOKENS * unit, MAX_FRAME_TOKENS * unit))
    return {
        "fps": video.get("fps", 2),
        "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        "rescale_factor": video.get("rescale_factor", 1 / 255),
        "image_mean": video.get("image_mean", [0.5] * 3), "image_std": video.get("image_std", [0.5] * 3),
        "resample": RESAMPLE.get(video.get("resample", 3), "bicubic"),
        "min_pixels": bounds[0], "max_pixels": bounds[1],  # per frame
        "pixel_bounds": "checkpoint" if declared else "StreamingVLM",
        "checkpoint_size": video.get("size"),  # the processor's own bounds (pixels summed over frames), for reference
    }


def _stop_tokens(source: Source, special: dict) -> list[int]:
    path = source.file("generation_config.json") if source.folder else None
    eos = json.loads(path.read_text()).get("eos_token_id") if path else None
    if eos is None:
        return [special["im_end"], special["endoftext"]]
    return [eos] if isinstance(eos, int) else list(eos)


def _chat_template(source: Source) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        path = source.file(name)
        if path:
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def build_manifest(source: Source, inv_freq, out: Path, dtype: str, embeddings: dict, tokenizer: dict) -> dict:
    import onnxruntime
    import torch
    import transformers

    config = source.config
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    special = _special_ids(out, config)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": source.name, "dtype": dtype,
        "source": {"identity": source.identity, "random_weights": source.folder is None},
        "tools": {"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "onnx": onnx.__version__,
                  "onnxruntime": onnxruntime.__version__},
        "text": {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
                 "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
                 "head_dim": text.head_dim, "vocab_size": text.vocab_size, "rms_norm_eps": text.rms_norm_eps,
                 "rope_theta": rope["rope_theta"], "mrope_section": list(rope["mrope_section"]),
                 "inv_freq": [float(f) for f in inv_freq],
                 "mrope_interleaved": bool(rope.get("mrope_interleaved", True))},
        "vision": {"depth": vision.depth, "hidden_size": vision.hidden_size, "num_heads": vision.num_heads,
                   "out_hidden_size": vision.out_hidden_size, "patch_size": vision.patch_size,
                   "temporal_patch_size": vision.temporal_patch_size, "spatial_merge_size": vision.spatial_merge_size,
                   "in_channels": vision.in_channels, "num_position_embeddings": vision.num_position_embeddings,
                   "position_grid_side": int(vision.num_position_embeddings ** 0.5),
                   "deepstack_visual_indexes": list(vision.deepstack_visual_indexes)},
        "tokens": special,
        "stop_tokens": _stop_tokens(source, special),
        "preprocess": _preprocess(source, vision),
        "chat_template": _chat_template(source),
        # How the runtime must treat the cache (see export/decoder.py).
        "cache": {"past_key": "after RoPE", "new_key_raw": "after k_norm, before RoPE",
                  "past_mask": "1 = attend to the cache slot", "new_mask": "1 = real token, 0 = padding; causal",
                  "deepstack": "added after decoder layers 0..n-1 at visual positions; zero elsewhere"},
        "graphs": {name: graph_contract(out / f"{name}.onnx")
                   for name in ("vision", "decoder", "prefill", "cache_write", "cache_rope")},
        "embeddings": embeddings,
        "tokenizer": tokenizer,
        "config": config.to_dict(),
    }


def file_table(out: Path) -> dict:
    """sha256 and size of every artifact file (all but the manifest itself)."""
    return {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}
