"""fp16 graphs hold their written budget against fp32 (export/verify.py): 1e-2 x max(1, max|ref|) per tensor and
>= 90% greedy top-1 agreement. ONNX Runtime's CPU provider runs fp16 nodes it has no kernel for in fp32 between
fp16 tensors, so the faithful run here is ONNX's reference evaluator, which rounds every op to fp16."""

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from conftest import hf_folder
from export.check import check
from export.pipeline import ExportOptions, run
from export.verify import AGREEMENT, RTOL
from runtime.manifest import Manifest
from runtime.model import Model


def test_tiny_fp16_export_holds_its_budget(tiny16):
    manifest = Manifest.load(tiny16)
    assert manifest["dtype"] == "fp16" and manifest["embeddings"]["dtype"] == "float16"
    errors = manifest["verification"]["max_abs_errors"]
    assert 0 < errors["prefill logits (video prompt, DeepStack)"] < RTOL["fp16"]
    assert manifest["verification"]["greedy_agreement"] >= AGREEMENT["fp16"]
    decoder = {v["name"]: v["dtype"] for v in manifest["graphs"]["decoder"]["inputs"]}
    assert decoder["past_key.0"] == "float16" and manifest["graphs"]["decoder"]["outputs"][0]["dtype"] == "float32"
    assert check(tiny16) == []


def _prompt(model, rng, length):
    return (rng.standard_normal((1, length, model.hidden)) * 0.5).astype(np.float32)


def test_faithful_fp16_long_greedy_run_stays_within_budget(tiny_graphs, tiny16):
    """64 teacher-forced decode steps after a 40-token prefill: fp16 rounded at every op (reference evaluator)
    against fp32 ONNX Runtime. Top-1 agreement and the max logit error over the run, with no growth over time."""
    m32, m16 = Model(Manifest.load(tiny_graphs)), Model(Manifest.load(tiny16))
    faithful = ReferenceEvaluator(onnx.load(str(tiny16 / "decoder.onnx")))
    rng = np.random.default_rng(0)
    embeds = _prompt(m32, rng, 40)
    deepstack = np.zeros((m32.n_deepstack, 1, 40, m32.hidden), np.float32)
    positions = np.tile(np.arange(40), (3, 1, 1))
    caches = {32: (m32.empty_cache(), m32.empty_cache()), 16: (m16.empty_cache(), m16.empty_cache())}

    def step(embeds, deepstack, positions):
        past = caches[32][0][0].shape[2]
        masks = (np.ones((1, past), np.int64), np.ones((1, embeds.shape[1]), np.int64))
        out32 = m32.step(embeds, deepstack, positions, *masks, *caches[32])
        feeds = {"inputs_embeds": embeds.astype(np.float16), "deepstack_embeds": deepstack.astype(np.float16),
                 "position_ids": positions, "past_mask": masks[0], "new_mask": masks[1]}
        for i in range(m16.layers):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = caches[16][0][i], caches[16][1][i]
        out16 = faithful.run(None, feeds)
        n = m16.layers
        for bits, keys, values in ((32, out32.keys, out32.values), (16, out16[1:1 + n], out16[1 + n:1 + 2 * n])):
            caches[bits] = ([np.concatenate([a, b], 2) for a, b in zip(caches[bits][0], keys)],
                            [np.concatenate([a, b], 2) for a, b in zip(caches[bits][1], values)])
        return out32.logits[0], out16[0][0]

    errors, agree = [], []
    logits32, logits16 = step(embeds, deepstack, positions)
    for k in range(64):
        errors.append(float(np.abs(logits16 - logits32).max()))
        agree.append(logits16.argmax() == logits32.argmax())
        token = int(logits32.argmax())  # teacher forcing: both read the fp32 choice
        logits32, logits16 = step(m32.embed([token])[None], np.zeros((m32.n_deepstack, 1, 1, m32.hidden), np.float32),
                                  np.full((3, 1, 1), 40 + k, np.int64))
    scale = max(1.0, float(np.abs(logits32).max()))
    assert max(errors) <= RTOL["fp16"] * scale, errors
    assert np.mean(agree) >= AGREEMENT["fp16"]
    assert np.mean(errors[-16:]) <= 2 * np.mean(errors[:16]) + 1e-4  # no drift along the run


def test_real_width_fp16_export_holds_its_budget(tmp_path):
    folder = hf_folder(tmp_path / "wide", "Qwen3-VL-4B", **{
        "text_config.num_hidden_layers": 3, "vision_config.depth": 3, "vision_config.deepstack_visual_indexes": [0, 1, 2]})
    out = run(ExportOptions(str(folder), tmp_path / "graphs", dtype="fp16", random_weights=True,
                            migraphx=False))  # too slow on MIGraphX's ref target at these widths (test_export.py)
    manifest = Manifest.load(out)
    assert manifest["verification"]["greedy_agreement"] >= AGREEMENT["fp16"]
    assert (out / "decoder.onnx.data").stat().st_size < 1.6e9  # half the fp32 weights
    assert check(out) == []


def test_fp16_graphs_stream_on_the_static_path_as_on_the_dynamic_one(tiny16, tmp_path):
    from runtime.commentator import Commentator, StreamConfig
    from runtime.context import Settings
    from runtime.sampling import Sampling
    from test_stream import chunks_of, lossless_clip

    manifest = Manifest.load(tiny16)
    settings, greedy = Settings(3, 4, 6, 10), Sampling(temperature=0)
    chunks = chunks_of(manifest, lossless_clip(tmp_path / "clip.mkv", 8, fps=4))
    dynamic = Commentator(Model(manifest), StreamConfig(settings, greedy, max_new_tokens=6))
    static = Commentator(Model(manifest), StreamConfig(settings, greedy, max_new_tokens=6, static=True))
    for chunk in chunks:
        a, b = dynamic.step(chunk), static.step(chunk)
        assert a.tokens == b.tokens and np.abs(a.logits - b.logits).max() < RTOL["fp16"]
