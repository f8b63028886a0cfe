"""llama.cpp as the bench's peer: a missing llama.cpp is a one-line error; present, it runs the same tiny model."""

import importlib.metadata
import json
import os

import pytest

from bench.llama_cpp import peer_rows
from conftest import ROOT


def test_missing_llama_cpp_is_a_one_line_error(tmp_path, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    result = peer_rows("tiny", (32,), 1, tmp_path, log=lambda _: None)
    assert list(result) == ["error"] and "llama-cpp-python is not installed" in result["error"]
    assert "\n" not in result["error"]


def _converter_source() -> str | None:
    """An unpacked llama.cpp with its converter, without the network: $LLAMA_CPP_SRC or what a bench run kept."""
    if os.environ.get("LLAMA_CPP_SRC"):
        return os.environ["LLAMA_CPP_SRC"]
    try:
        kept = ROOT / "build/bench/llama/src" / f"llama-cpp-python-{importlib.metadata.version('llama-cpp-python')}"
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(kept / "llama.cpp") if (kept / "done").exists() else None


def test_tiny_model_through_llama_cpp_matches_transformers(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    source = _converter_source()
    if source is None:
        pytest.skip("no llama.cpp converter here: set LLAMA_CPP_SRC or run `python -m bench.llama_cpp` once")
    monkeypatch.setenv("LLAMA_CPP_SRC", source)
    result = peer_rows("tiny", (32, 64), 1, tmp_path, log=lambda _: None)
    assert "error" not in result, result.get("error")
    assert result["logit_check"]["f32"]["rel_diff_exact"] < 1e-4  # the same model, not a look-alike
    assert result["logit_check"]["f32"]["argmax_agree"] == 16
    for kind in ("f32", "q4_0"):
        assert set(result[f"{kind}_ms"]) == {32, 64} and all(ms > 0 for ms in result[f"{kind}_ms"].values())
        assert result["gguf_bytes"][kind] > 0 and result["rss"][kind]["model_loaded"] > 0
    assert result["gguf_bytes"]["q4_0"] < result["gguf_bytes"]["f32"]
    assert "q4_0" in result["tensor_types"]["q4_0"]


def test_bench_full_times_int4_and_q4_0_in_turn(tmp_path, monkeypatch):
    """`make bench-full`'s plumbing on the tiny model: the int4 export, llama.cpp's F16 conversion and Q4_0, both
    timed in turn at each length and for a fill, ratios with ranges, floors probed, a table written."""
    pytest.importorskip("llama_cpp")
    source = _converter_source()
    if source is None:
        pytest.skip("no llama.cpp converter here: set LLAMA_CPP_SRC or run `python -m bench.llama_cpp` once")
    monkeypatch.setenv("LLAMA_CPP_SRC", source)
    from bench.full import main

    assert main(["--model", "tiny", "--lengths", "32", "64", "--prefill", "16", "--rounds", "2", "--root",
                 str(tmp_path / "root"), "--results", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "full.json").read_text())
    assert result["setup"]["llama_cpp"]["converter"].startswith("convert_hf_to_gguf.py --outtype f16")
    made = {path.name for path in (tmp_path / "root" / "llama").glob("*/*.gguf")}
    assert made == {"model-f16.gguf", "model-q4_0.gguf"}  # no F32 file: the whole 4B's would not fit
    for n in ("32", "64"):
        assert len(result["times_ms"]["decode"][n]["int4"]) == len(result["times_ms"]["decode"][n]["llama_q4_0"]) == 2
        r = result["decode_vs_q4_0"][n]
        assert r["range"][0] <= r["median"] <= r["range"][1] and r["median"] > 0
    assert result["prefill_ms"]["int4"] > 0 and result["prefill_ms"]["llama_q4_0"] > 0
    assert result["llama_logit_check"]["q4_0"]["tokens"] == 16 and result["resident_mib"]["int4"] > 0
    assert len(result["floors"]["probes"]) == 2 and "| prefill, 16 tokens onto 64 |" in (
        tmp_path / "out" / "full.md").read_text()
