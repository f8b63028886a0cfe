"""The benchmark's smoke version: tiny sizes, seconds; it checks that results are well formed, never timings."""

import json

from bench.__main__ import main
from bench.soak import main as soak


def test_quick_bench_writes_well_formed_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    assert main(["--quick", "--results", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("decode_ms", "torch_decode_ms", "decode_speedup", "prefill_ms", "torch_prefill_ms",
                "vision_ms_per_chunk", "read_gbs", "gemm_gflops", "noisy", "below_floor", "decode_read_floor_ms",
                "rtf", "torch_rtf", "decode_speedup_bound", "prefill_floor_ms", "vision_floor_ms", "vision_vs_floor"):
        assert key in summary, key
    assert not {"bandwidth_gbs", "decode_floor_ms", "copy_gbs"} & set(summary)  # the old copy-bandwidth floor
    assert set(summary["decode_ms"]) == set(summary["torch_decode_ms"]) and all(
        v > 0 for v in summary["decode_ms"].values())
    decode = json.loads((out / "decode.json").read_text())
    assert {"provider", "dtype", "threads", "hidden", "layers", "rounds"} <= set(decode["setup"])
    floors = json.loads((out / "bandwidth.json").read_text())
    assert [p["when"] for p in floors["probes"]] == ["start", "after the timed sections", "end"]
    assert set(floors["probes"][0]["read_gbs"]) == {"gemv", "int4_gemv", "numpy"}
    assert floors["read_gbs"] == max(max(p["read_gbs"].values()) for p in floors["probes"])
    assert not floors["enforced"]  # --quick's tiny model sits in the caches: a floor there means nothing
    assert "| decode step" in (out / "README.md").read_text()

    assert soak(["--minutes", "0.1", "--results", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    soaked = json.loads((out / "soak.json").read_text())
    assert "memory_growth_pct" in summary and len(soaked["samples"]) == 6


def test_prefill_flops_match_torch_flop_counter(tiny_graphs):
    """The compute floor's numerator is the count torch's own flop counter makes of the transformers step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import DynamicCache

    from bench.measure import decoder_flops
    from export.load import resolve
    from runtime.manifest import Manifest
    from runtime.model import Model

    hf = resolve("tiny", random_weights=True).build_model()
    hf.set_attn_implementation("eager")  # the counter sees eager attention's matmuls, not sdpa's fused kernel
    cfg, past, new = hf.config.text_config, 40, 7
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        cache.update(*(torch.randn(1, cfg.num_key_value_heads, past, cfg.head_dim) for _ in range(2)), i)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hf(inputs_embeds=torch.randn(1, new, cfg.hidden_size), cache=cache, use_cache=True, logits_to_keep=1,
           position_ids=torch.arange(past, past + new).view(1, 1, -1).expand(3, 1, -1),
           attention_mask=torch.ones(1, past + new, dtype=torch.long))
    assert decoder_flops(Model(Manifest.load(tiny_graphs)), past, new) == counter.get_total_flops()


def test_vision_flops_match_torch_flop_counter(tiny_graphs):
    """The vision floor's numerator, likewise, on two temporal patches of a non-square grid."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.measure import vision_flops
    from export.load import resolve
    from runtime.manifest import Manifest
    from runtime.model import Model

    hf = resolve("tiny", random_weights=True).build_model()
    hf.set_attn_implementation("eager")
    cfg, frames, grid_h, grid_w = hf.config.vision_config, 2, 6, 10
    row = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hf.model.visual(torch.randn(frames * grid_h * grid_w, row), torch.tensor([[frames, grid_h, grid_w]]))
    assert vision_flops(Model(Manifest.load(tiny_graphs)), grid_h, grid_w, frames) == counter.get_total_flops()


def test_streams_bench_measures_batched_steps_and_a_server(tiny_graphs, tmp_path):
    """bench/streams.py's measurements, on tiny: well-formed, the batch really shared (never timings)."""
    from bench.streams import decode_rows, prefill_rows, real_time, serve_run
    from runtime.manifest import Manifest
    from runtime.model import Model
    from runtime.sample import write_clip

    steps = decode_rows(Model(Manifest.load(tiny_graphs)), rows=(1, 2, 4), cached=(32,), rounds=2)[32]
    assert sorted(steps) == [1, 2, 4] and steps[1]["ratio"] == 1.0
    assert all(s["ms"] > 0 and s["tokens_per_s"] > 0 and len(s["ratio_range"]) == 2 for s in steps.values())
    prefills = prefill_rows(Model(Manifest.load(tiny_graphs)), rows=(1, 2), new=8, cached=32, rounds=2)
    assert sorted(prefills) == [1, 2] and prefills[1]["ratio"] == 1.0 and prefills[2]["ms"] > 0
    clip = write_clip(tmp_path / "clip.mp4", 3, 64, 64, 4)
    row = serve_run(tiny_graphs, clip, 2, True, threads=2, seconds=3)
    assert row["streams"] == 2 and len(row["dropped"]) == 2 and row["media_per_wall_second"] > 0
    assert row["mean_batch"] is not None and row["lag_p90"] is not None
    assert real_time([row], True, chunk=1e9) in (0, 2)


def test_floors_divide_by_the_best_probe_and_catch_a_step_under_its_floor(tiny_graphs):
    """A floor divides by the best figure any probe saw; a run whose first and last probes differ by more than 15%
    is flagged noisy; a step measured under its floor is named (make bench then fails)."""
    from bench.__main__ import _floors
    from bench.measure import Floors, decoder_bytes, decoder_flops
    from runtime.manifest import Manifest
    from runtime.model import Model

    model = Model(Manifest.load(tiny_graphs))
    floors = Floors(threads=2, quick=False)
    floors.probes = [
        {"when": "start", "read_gbs": {"gemv": 10.0, "int4_gemv": 12.0, "numpy": 4.0}, "gemm_gflops": 50.0},
        {"when": "end", "read_gbs": {"gemv": 9.0, "int4_gemv": 9.5, "numpy": 4.0}, "gemm_gflops": 80.0}]
    floor_64 = decoder_bytes(model, 64) / 12e9 * 1e3  # ms at the best read figure (int4_gemv, start)
    decode = {"setup": {"threads": 2}, "onnx_ms": {64: floor_64 * 0.9, 4096: 1e4}, "torch_ms": {64: 1.0, 4096: 1.0}}
    prefill = {"setup": {"cache_tokens": 64, "new_tokens": 8}, "onnx_ms": 1e4, "torch_ms": 1e4}
    vision = {"setup": {"patch_grid": [4, 8]}, "onnx_ms": 1e4, "torch_ms": 1e4}
    results = {"decode": decode, "prefill": prefill, "vision": vision,
               "int4": {"decode_ms": {64: 1e4, 4096: 1e4}}}
    out = _floors(floors, model, model, results, quick=False)
    assert out["read_gbs"] == 12.0 and out["read_method"] == "int4_gemv" and out["gemm_gflops"] == 80.0
    assert abs(out["fp32_decode_floor_ms"][64] - floor_64) < 1e-12
    assert abs(out["prefill_floor_ms"] - decoder_flops(model, 64, 8) / 80e9 * 1e3) < 1e-12
    assert out["noisy"] and abs(out["drift"]["gemm"] - 30 / 80) < 1e-12  # read: 12 -> 9.5 is 21%, also noisy
    assert len(out["below_floor"]) == 1 and out["below_floor"][0].startswith("fp32 decode step at 64")
    decode["onnx_ms"][64] = floor_64 * 1.1
    assert _floors(floors, model, model, results, quick=False)["below_floor"] == []


def test_profile_splits_a_step_into_weight_products_and_the_rest(tiny_graphs):
    """bench.profile: the runtime's own session profiled; every kernel counted once, in one class; the bound is
    what the profile says (total over what is left if the weight products cost nothing)."""
    from bench.profile import profile

    r = profile(tiny_graphs, past=64, new=16, runs=3)
    assert r["graph"] == "prefill" and r["total_ms"] > 0
    assert abs(sum(r["ms"].values()) - r["total_ms"]) < 1e-6
    assert 0 < r["weight_products_share"] < 1 and "MatMul" in r["ms"]  # attention's products are not on weights
    assert abs(r["bound_if_products_were_free"] - 1 / (1 - r["weight_products_share"])) < 1e-9
