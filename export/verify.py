"""The proof every export must pass: ONNX Runtime (CPU) against the transformers model on fresh random inputs.

Tolerance (fp32): max abs error <= 1e-4 x max(1, max |reference|) on every compared tensor (logits, vision
embeddings, DeepStack features, new keys and values), and greedy tokens identical. fp32 reorderings of the same
sums (MatMul vs Conv3d, fused kernels, scaled-Q attention) cost ~1e-7 relative per op; 1e-4 leaves room for deep
real-width stacks while still failing on any real mistake (a wrong RoPE channel or mask is off by >1e-2).

Budget (fp16, against the same fp32 transformers model): 1e-2 x max(1, max |reference|) per tensor and at
least 90% greedy top-1 agreement. fp16 storage rounds at 2^-11 ~ 5e-4 relative; measured on tiny: ~1e-3
relative on logits, so the budget has a 10x margin yet catches a missing fp32 island (softmax or RMSNorm in fp16
is off by >5e-2).

The two sides run one after the other on the same inputs (`cases`, then `reference` with transformers, then
`candidate` with ONNX Runtime), so a caller can free the PyTorch model before the ONNX sessions load: a 4B
model in fp32 does not fit in memory twice.
"""

import numpy as np
import onnxruntime as ort

from runtime.model import Model
from runtime.positions import rope_positions, spans_of
from runtime.rope import Rope

RTOL = {"fp32": 1e-4, "fp16": 1e-2}  # x max(1, max |reference|), per compared tensor
AGREEMENT = {"fp32": 1.0, "fp16": 0.9}  # greedy top-1 agreement with generate(), teacher-forced
GREEDY_TOKENS = 16
VISION_GRIDS = ((1, 2, 2), (2, 3, 5), (1, 6, 2), (3, 1, 3))  # (temporal patches, rows, cols) in merge blocks
DECODE_SHAPES = ((1, 1, 1), (1, 1, 37), (2, 1, 64), (2, 3, 20))  # (batch, new tokens, cached tokens)
STEP_GRAPHS = ("decoder", "prefill")  # two layouts of the same step: each must pass every decode case


class VerificationError(Exception):
    pass


def cases(config, seed: int = 0) -> dict:
    """Random inputs for every check, from the config alone."""
    rng = np.random.default_rng(seed)
    vision, text = config.vision_config, config.text_config
    m, row = vision.spatial_merge_size, vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    out = {"vision": [rng.standard_normal((t, h * w * m * m, row), dtype=np.float32) for t, h, w in VISION_GRIDS]}
    # a video prompt: text, then each temporal patch as <text> <vision_start> video_pad x n <vision_end>, then text
    frames, grid = 2, (3, 2)  # merged tokens per temporal patch (rows, cols): non-square on purpose
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}

    def words(n):
        return [int(x) for x in rng.integers(0, text.vocab_size, n) if x not in special] or [1]

    ids = words(6)
    for _ in range(frames):
        ids += words(3) + [config.vision_start_token_id] + [config.video_token_id] * (grid[0] * grid[1])
        ids += [config.vision_end_token_id]
    out["prompt"] = {"ids": np.array(ids + words(5), np.int64), "grid": grid, "frames": frames,
                     "patches": rng.standard_normal((frames, grid[0] * grid[1] * m * m, row), dtype=np.float32)}
    out["decode"] = []
    for batch, new, past in DECODE_SHAPES:
        shape = (batch, text.num_key_value_heads, past, text.head_dim)
        positions = np.broadcast_to(rng.integers(0, 4 * past + 8, (1, batch, new)), (3, batch, new)).copy()
        positions[1:] += rng.integers(0, 3, (2, batch, new))  # distinct t/h/w rows exercise every MRoPE section
        mask = np.ones((batch, past + new), np.int64)
        mask[:, : past // 3 : 2] = 0  # evicted slots
        mask[-1, past // 2] = 0
        if new > 1:
            mask[0, past] = 0  # a left-padded new token (static-shape prefill)
        out["decode"].append({
            "label": f"decode B={batch} S={new} cache={past}",
            "keys": [rng.standard_normal(shape, dtype=np.float32) for _ in range(text.num_hidden_layers)],
            "values": [rng.standard_normal(shape, dtype=np.float32) for _ in range(text.num_hidden_layers)],
            "embeds": rng.standard_normal((batch, new, text.hidden_size), dtype=np.float32),
            "positions": positions, "mask": mask})
    # the device-cache graphs: rotate a whole cache to new positions; scatter a step's K/V into chosen slots
    layers, shape = text.num_hidden_layers, (1, text.num_key_value_heads, 40, text.head_dim)
    out["cache"] = {"raw": [rng.standard_normal(shape, dtype=np.float32) for _ in range(layers)],
                    "positions": rng.integers(0, 5000, (3, 40)), "slots": np.array([3, 17, 39, 0]),
                    "new_mask": np.array([1, 1, 0, 1]),
                    "new": [rng.standard_normal(shape[:2] + (4, shape[3]), dtype=np.float32) for _ in range(layers)]}
    return out


def reference(hf_model, cases: dict) -> dict:
    """What transformers computes for every case."""
    import torch
    from transformers import DynamicCache
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    out, config = {}, hf_model.config
    m = config.vision_config.spatial_merge_size
    with torch.no_grad():
        for (t, h, w), patches in zip(VISION_GRIDS, cases["vision"]):
            ref = hf_model.model.visual(torch.from_numpy(patches.reshape(t * patches.shape[1], -1)),
                                        torch.tensor([[t, h * m, w * m]]))
            out[f"vision {t}x{h * m}x{w * m}"] = (ref.pooler_output.numpy(),
                                                  torch.stack(ref.deepstack_features).numpy())
        prompt = cases["prompt"]
        ids = torch.from_numpy(prompt["ids"])[None]
        frames, (gh, gw) = prompt["frames"], prompt["grid"]
        kwargs = dict(input_ids=ids, pixel_values_videos=torch.from_numpy(prompt["patches"].reshape(-1, prompt["patches"].shape[-1])),
                      video_grid_thw=torch.tensor([[frames, gh * m, gw * m]]),
                      mm_token_type_ids=(ids == config.video_token_id).long() * 2, attention_mask=torch.ones_like(ids))
        positions, _ = hf_model.model.get_rope_index(ids, kwargs["mm_token_type_ids"],
                                                     video_grid_thw=kwargs["video_grid_thw"])
        result = hf_model(**kwargs, use_cache=True)
        generated = hf_model.generate(**kwargs, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        out["prompt"] = {"positions": positions[:, 0].numpy(), "logits": result.logits[:, -1].numpy(),
                         "keys": [layer.keys.numpy() for layer in result.cache.layers],
                         "values": [layer.values.numpy() for layer in result.cache.layers],
                         "tokens": generated[0, ids.shape[1]:].tolist()}
        for case in cases["decode"]:
            cache = DynamicCache(config=config.text_config)
            for i, (k, v) in enumerate(zip(case["keys"], case["values"])):
                cache.update(torch.from_numpy(k), torch.from_numpy(v), i)
            past = case["keys"][0].shape[2]
            result = hf_model(inputs_embeds=torch.from_numpy(case["embeds"]), position_ids=torch.from_numpy(case["positions"]),
                              attention_mask=torch.from_numpy(case["mask"]), cache=cache, use_cache=True)
            expected = {"logits": result.logits[:, -1].numpy(),
                        "keys": [layer.keys[:, :, past:].numpy() for layer in cache.layers],
                        "values": [layer.values[:, :, past:].numpy() for layer in cache.layers]}
            out.update({f"{case['label']} {graph}.onnx": expected for graph in STEP_GRAPHS})
        c = cases["cache"]
        cos, sin = hf_model.model.language_model.rotary_emb(torch.zeros(1), torch.from_numpy(c["positions"])[:, None])
        out["cache rope"] = [apply_rotary_pos_emb(torch.from_numpy(k), torch.from_numpy(k), cos, sin)[0].numpy()
                             for k in c["raw"]]
    out["cache write"] = _scattered(cases["cache"])
    return out


def _scattered(c: dict) -> list[np.ndarray]:
    """What cache_write must leave in a cache: the new K/V in their slots, the rest untouched."""
    caches = [raw.copy() for raw in c["raw"]]
    for cache, new in zip(caches, c["new"]):
        cache[:, :, c["slots"]] = new
    return caches


def candidate(model: Model, cases: dict, config, teacher: list[int]) -> dict:
    """What the exported graphs compute for every case, driven the way the runtime drives them. Greedy decoding
    is teacher-forced with generate()'s tokens: every argmax equal means the free-running sequences are equal,
    and one fp16 near-tie does not derail the rest of the comparison."""
    out, m = {}, model.merge
    for (t, h, w), patches in zip(VISION_GRIDS, cases["vision"]):
        out[f"vision {t}x{h * m}x{w * m}"] = model.encode_video(patches, h * m, w * m)

    prompt = cases["prompt"]
    ids, grid, frames = prompt["ids"], prompt["grid"], prompt["frames"]
    vision_embeds, vision_deepstack = model.encode_video(prompt["patches"], grid[0] * m, grid[1] * m)
    visual = ids == config.video_token_id
    embeds = model.embed(ids)
    embeds[visual] = vision_embeds
    deepstack = np.zeros((model.n_deepstack, len(ids), model.hidden), np.float32)
    deepstack[:, visual] = vision_deepstack
    positions, next_pos = rope_positions(spans_of(ids, config.video_token_id, [grid] * frames))
    step = model.step(embeds[None], deepstack[:, None], positions[:, None], np.ones((1, 0), np.int64),
                      np.ones((1, len(ids)), np.int64), model.empty_cache(), model.empty_cache())
    result = {"positions": positions, "logits": step.logits, "keys": step.keys, "values": step.values}
    # greedy decoding, the cache growing by the new tokens' K/V
    keys, values, tokens = step.keys, step.values, [int(step.logits[0].argmax())]
    zeros = np.zeros((model.n_deepstack, 1, 1, model.hidden), np.float32)
    for k in range(GREEDY_TOKENS - 1):
        position = np.full((3, 1, 1), next_pos + k, np.int64)
        one = np.ones((1, 1), np.int64)
        step = model.step(model.embed([teacher[k]])[None], zeros, position, np.ones((1, keys[0].shape[2]), np.int64),
                          one, keys, values)
        keys = [np.concatenate([a, b], axis=2) for a, b in zip(keys, step.keys)]
        values = [np.concatenate([a, b], axis=2) for a, b in zip(values, step.values)]
        tokens.append(int(step.logits[0].argmax()))
    out["prompt"] = {**result, "tokens": tokens}

    text = model.manifest["text"]
    rope = Rope(text["inv_freq"], text["mrope_section"])
    for case in cases["decode"]:
        deepstack = np.zeros((model.n_deepstack, *case["embeds"].shape), np.float32)
        past = case["keys"][0].shape[2]
        for graph in STEP_GRAPHS:
            step = model.step(case["embeds"], deepstack, case["positions"], case["mask"][:, :past],
                              case["mask"][:, past:], case["keys"], case["values"], graph)
            # the pre-RoPE master copy, rotated on the host as the runtime does after eviction
            out[f"{case['label']} {graph}.onnx"] = {
                "logits": step.logits, "keys": step.keys, "values": step.values,
                "keys_raw_rotated": [rope.rotate(k, case["positions"]) for k in step.keys_raw]}

    c = cases["cache"]
    layers = len(c["raw"])
    f = model.cache_dtype
    feeds = {"positions": c["positions"], **{f"key_raw.{i}": k.astype(f) for i, k in enumerate(c["raw"])}}
    out["cache rope"] = model.session("cache_rope").run(None, feeds)
    writer = model.session("cache_write")
    arrays = {f"{part}.{i}": c["raw"][i].astype(f) for part in ("key", "key_raw", "value") for i in range(layers)}
    buffers = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}  # views: keep `arrays`
    binding = writer.io_binding()  # in place, as the runtime binds it
    for name, value in buffers.items():
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace(".", "_out.", 1), value)
        binding.bind_cpu_input("new_" + name, c["new"][int(name.split(".")[1])].astype(f))
    mask_array = np.zeros((1, 40), np.int64)
    mask = ort.OrtValue.ortvalue_from_numpy(mask_array)
    binding.bind_ortvalue_input("mask", mask)
    binding.bind_ortvalue_output("mask_out", mask)
    binding.bind_cpu_input("slots", c["slots"])
    binding.bind_cpu_input("new_mask", c["new_mask"])
    writer.run_with_iobinding(binding)
    out["cache write"] = [arrays[f"{part}.{i}"] for part in ("key", "key_raw", "value") for i in range(layers)]
    out["cache write mask"] = mask_array
    return out


def compare(expected: dict, actual: dict, dtype: str = "fp32", log=print) -> dict:
    """Max abs error per check and the greedy agreement; raises VerificationError on the first check over its
    budget for `dtype`."""
    errors, agreement = {}, None

    def close(name, a, e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        error = float(np.abs(a - e).max()) if e.size else 0.0
        tolerance = RTOL[dtype] * max(1.0, float(np.abs(e).max()) if e.size else 0.0)
        errors[name] = error
        log(f"  {name:<58} max abs error {error:.2e}  (tolerance {tolerance:.1e})")
        if not error <= tolerance:
            raise VerificationError(f"{name}: max abs error {error:.3e} exceeds {tolerance:.1e}")

    def same(name, a, e):
        log(f"  {name:<58} {'identical' if np.array_equal(a, e) else 'DIFFERENT'}")
        if not np.array_equal(a, e):
            raise VerificationError(f"{name}: ONNX {list(np.ravel(a))[:24]} != transformers {list(np.ravel(e))[:24]}")

    for name in expected:
        e, a = expected[name], actual[name]
        if name.startswith("vision"):
            close(f"{name} embeds", a[0], e[0])
            close(f"{name} deepstack", a[1], e[1])
        elif name == "cache rope":
            close("cache_rope: whole cache to new positions", a, e)
        elif name == "cache write":
            stored = np.asarray(a).dtype  # a pure data move: exact in the export dtype
            same("cache_write: new K/V in their slots, in place", a, np.asarray(e * 3).astype(stored))
            mask = np.zeros((1, 40), np.int64)
            mask[0, [3, 17, 0]] = 1  # the slot written with new_mask 0 stays unattended
            same("cache_write: mask bits", actual["cache write mask"], mask)
        elif name == "prompt":
            same("rope positions (t, h, w) of the video prompt", a["positions"], e["positions"])
            close("prefill logits (video prompt, DeepStack)", a["logits"], e["logits"])
            close("prefill new keys (post-RoPE), all layers", a["keys"], e["keys"])
            close("prefill new values, all layers", a["values"], e["values"])
            agreement = agree = float(np.mean(np.equal(a["tokens"], e["tokens"])))
            log(f"  {f'greedy top-1 vs generate() ({GREEDY_TOKENS} tokens)':<58} {agree:.0%} agree "
                f"(budget {AGREEMENT[dtype]:.0%})")
            if agree < AGREEMENT[dtype]:
                raise VerificationError(f"greedy tokens: ONNX {a['tokens']} != transformers {e['tokens']}")
        else:
            close(f"{name} logits", a["logits"], e["logits"])
            close(f"{name} new keys", a["keys"], e["keys"])
            close(f"{name} new values", a["values"], e["values"])
            close(f"{name} raw keys, host-rotated", a["keys_raw_rotated"], e["keys"])
    return {"max_abs_errors": errors, "greedy_agreement": agreement}


def verify(hf_model, model: Model, seed: int = 0, log=print) -> dict:
    inputs = cases(hf_model.config, seed)
    expected = reference(hf_model, inputs)
    actual = candidate(model, inputs, hf_model.config, expected["prompt"]["tokens"])
    return compare(expected, actual, model.manifest["dtype"], log)
