"""The benchmark's smoke version: tiny sizes, seconds; it checks that results are well formed, never timings."""

import json

from bench.__main__ import main
from bench.soak import main as soak


def test_quick_bench_writes_well_formed_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    assert main(["--quick", "--results", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("decode_ms", "torch_decode_ms", "prefill_ms", "torch_prefill_ms", "vision_ms_per_chunk",
                "bandwidth_gbs", "decode_floor_ms", "rtf", "torch_rtf"):
        assert key in summary, key
    assert set(summary["decode_ms"]) == set(summary["torch_decode_ms"]) and all(
        v > 0 for v in summary["decode_ms"].values())
    decode = json.loads((out / "decode.json").read_text())
    assert {"provider", "dtype", "threads", "hidden", "layers"} <= set(decode["setup"])
    assert "| decode step" in (out / "README.md").read_text()

    assert soak(["--minutes", "0.1", "--results", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    soaked = json.loads((out / "soak.json").read_text())
    assert "memory_growth_pct" in summary and len(soaked["samples"]) == 6
