"""make bench: speed against transformers and against the memory-bandwidth floor, all in one run.

    python -m bench [--quick] [--results bench/results]

Writes one JSON per section, `summary.json`, PNG plots (with matplotlib) and `README.md` (a table) under
--results. Every number carries its setup: provider, dtype, threads, widths and depth, cache length, frame size.
--quick is the smoke version the tests run: tiny sizes, seconds, well-formed output only.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path


from . import measure
from .models import build_exports

CACHE_LENGTHS = (256, 1024, 4096, 8192, 16384)
CHUNK_VISION_TOKENS = 720  # 1152 x 640 frames: (640/32) x (1152/32) merged tokens per 1-s chunk
CHUNK_TEXT_TOKENS = 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds: checks the plumbing only")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime and torch threads (0 = all cores)")
    args = p.parse_args(argv)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or os.cpu_count()

    import torch

    torch.set_num_threads(threads)
    exports = build_exports(Path("build/bench"), quick=args.quick)
    setup = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
             "provider": "CPUExecutionProvider", "dtype": "fp32", "torch_attention": "sdpa"}
    results, started = {}, time.perf_counter()

    wide = exports["wide"]
    model = wide.model(threads)
    hf = wide.hf_model()
    lengths = (64, 256) if args.quick else CACHE_LENGTHS
    print(f"decode step at {lengths} cached tokens ({wide.describe()['model']})", flush=True)
    decode = {"setup": {**setup, **wide.describe(), "new_tokens": 1},
              "onnx_ms": {n: measure.onnx_step_ms(model, n, 1) for n in lengths},
              "torch_ms": {n: measure.torch_step_ms(hf, n, 1) for n in lengths}}
    results["decode"] = decode
    print("chunk prefill, vision, bandwidth", flush=True)
    past = 256 if args.quick else 8192
    new = 24 if args.quick else CHUNK_VISION_TOKENS + CHUNK_TEXT_TOKENS
    results["prefill"] = {"setup": {**setup, **wide.describe(), "cache_tokens": past, "new_tokens": new},
                          "onnx_ms": measure.onnx_step_ms(model, past, new, repeat=3),
                          "torch_ms": measure.torch_step_ms(hf, past, new, repeat=3)}
    grid = (4, 8) if args.quick else (40, 72)  # patches of a 640 x 1152 frame pair
    results["vision"] = {"setup": {**setup, **wide.describe(), "frame": [grid[0] * 16, grid[1] * 16], "frames": 2,
                                   "patch_grid": list(grid)},
                         "onnx_ms": measure.onnx_vision_ms(model, *grid),
                         "torch_ms": measure.torch_vision_ms(hf, *grid)}
    del hf
    results["bandwidth"] = _floors(model, wide, setup, decode, results["prefill"], results["vision"], threads,
                                   args.quick)
    del model
    results["int4"] = _int4(exports, setup, decode, results["prefill"], results["bandwidth"], threads, args.quick)

    from .e2e import end_to_end

    print("end to end", flush=True)
    results["end_to_end"] = end_to_end(exports, threads, quick=args.quick)
    results["seconds"] = time.perf_counter() - started
    write_results(out, results)
    print(f"bench: {out} ({results['seconds']:.0f} s)")
    return 0


def _int4(exports, setup: dict, decode: dict, prefill: dict, floors: dict, threads: int, quick: bool) -> dict:
    """The int4 export of the same model beside fp32 and transformers, its own bandwidth floor, resident memory of
    both, and the peer a CPU user would pick instead, llama.cpp (F32 and Q4_0 GGUF of the same weights)."""
    wide, quant = exports["wide"], exports["wide_int4"]
    model = quant.model(threads)
    lengths = sorted(decode["onnx_ms"])
    print(f"int4 decode at {lengths} cached tokens, prefill, resident memory", flush=True)
    out = {"setup": {**setup, **quant.describe(), "dtype": "int4 weights (MatMulNBits, block 32, accuracy_level 4), "
                                                           "fp32 activations and cache"},
           **{key: model.manifest["quantization"][key] for key in ("scheme", "quality", "weight_rel_error",
                                                                   "budget_applies")},
           "decode_ms": {n: measure.onnx_step_ms(model, n, 1) for n in lengths},
           "prefill_ms": measure.onnx_step_ms(model, prefill["setup"]["cache_tokens"], prefill["setup"]["new_tokens"],
                                              repeat=3)}
    past = floors["setup"]["cache_tokens"]
    out["decode_bytes"] = measure.decoder_bytes(model, past)
    out["decode_read_floor_ms"] = out["decode_bytes"] / floors["read_gbs"] / 1e6
    out["achieved_gbs"] = out["decode_bytes"] / out["decode_ms"][past] / 1e6
    del model
    out["resident_mib"] = {"fp32": measure.resident_mib(wide.graphs, threads),
                           "int4": measure.resident_mib(quant.graphs, threads)}
    if quick:
        out["llama_cpp"] = {"error": "not run by --quick"}
    else:
        from .llama_cpp import peer_rows

        print("llama.cpp (the peer): F32 and Q4_0 GGUF of the same weights", flush=True)
        out["llama_cpp"] = peer_rows(wide.source, lengths, threads, Path("build/bench/llama"))
    return out


def _floors(model, wide, setup: dict, decode: dict, prefill: dict, vision: dict, threads: int, quick: bool) -> dict:
    """What this machine allows at best: a decode step must stream its weights and cache from memory, a prefill and
    a vision call must do their multiply-adds. Each floor, and the speed-up over transformers it caps, is measured
    in this run."""
    copy_gbs = measure.copy_bandwidth_gbs(64 if quick else 512)
    read_gbs = measure.read_bandwidth_gbs(threads, 64 if quick else 512)
    gflops = measure.gemm_gflops(threads, *((64, 256, 256) if quick else ()))
    past = 256 if quick else 4096
    decode_bytes = measure.decoder_bytes(model, past)
    cache, new = prefill["setup"]["cache_tokens"], prefill["setup"]["new_tokens"]
    prefill_flops = measure.decoder_flops(model, cache, new)
    read_floor_ms = decode_bytes / read_gbs / 1e6
    prefill_floor_ms = prefill_flops / gflops / 1e6
    vision_flops = measure.vision_flops(model, *vision["setup"]["patch_grid"])
    vision_floor_ms = vision_flops / gflops / 1e6
    return {"setup": {**setup, **wide.describe(), "cache_tokens": past, "prefill": f"{new} tokens onto {cache}"},
            "copy_gbs": copy_gbs, "decode_bytes": decode_bytes, "decode_floor_ms": decode_bytes / copy_gbs / 1e6,
            "decode_ms": decode["onnx_ms"][past], "achieved_gbs": decode_bytes / decode["onnx_ms"][past] / 1e6,
            "read_gbs": read_gbs, "decode_read_floor_ms": read_floor_ms,
            "decode_speedup_bound": decode["torch_ms"][past] / read_floor_ms,
            "gemm_gflops": gflops, "prefill_flops": prefill_flops, "prefill_floor_ms": prefill_floor_ms,
            "prefill_speedup_bound": prefill["torch_ms"] / prefill_floor_ms,
            "prefill_achieved_gflops": prefill_flops / prefill["onnx_ms"] / 1e6,
            "vision_flops": vision_flops, "vision_floor_ms": vision_floor_ms,
            "vision_vs_floor": vision["onnx_ms"] / vision_floor_ms,
            "vision_speedup_bound": vision["torch_ms"] / vision_floor_ms,
            "vision_achieved_gflops": vision_flops / vision["onnx_ms"] / 1e6}


def summary_of(results: dict) -> dict:
    decode, e2e = results["decode"], results["end_to_end"]
    lengths = sorted(decode["onnx_ms"])
    floor_at = results["bandwidth"]["setup"]["cache_tokens"]
    return {
        "decode_ms": {str(n): decode["onnx_ms"][n] for n in lengths},
        "torch_decode_ms": {str(n): decode["torch_ms"][n] for n in lengths},
        "decode_flatness": decode["onnx_ms"][lengths[-1]] / decode["onnx_ms"][lengths[0]],
        "prefill_ms": results["prefill"]["onnx_ms"], "torch_prefill_ms": results["prefill"]["torch_ms"],
        "vision_ms_per_chunk": results["vision"]["onnx_ms"], "torch_vision_ms_per_chunk": results["vision"]["torch_ms"],
        "bandwidth_gbs": results["bandwidth"]["copy_gbs"], "decode_floor_ms": results["bandwidth"]["decode_floor_ms"],
        "decode_floor_cache_tokens": floor_at,
        "decode_vs_floor": results["bandwidth"]["decode_ms"] / results["bandwidth"]["decode_floor_ms"],
        **{key: results["bandwidth"][key] for key in (
            "read_gbs", "decode_read_floor_ms", "decode_speedup_bound", "gemm_gflops", "prefill_floor_ms",
            "prefill_speedup_bound", "vision_floor_ms", "vision_vs_floor", "vision_speedup_bound")},
        "rtf": e2e["tiny"]["onnx"]["rtf"], "torch_rtf": e2e["tiny"]["torch"]["rtf"],
        "int4_decode_ms": {str(n): results["int4"]["decode_ms"][n] for n in lengths},
        "int4_prefill_ms": results["int4"]["prefill_ms"], "rtf_real_width_int4": e2e["wide_int4"]["onnx"]["rtf"],
        "int4_resident_mib": results["int4"]["resident_mib"]["int4"]["rss_mib"],
        "fp32_resident_mib": results["int4"]["resident_mib"]["fp32"]["rss_mib"],
        "rtf_real_width": e2e["wide"]["onnx"]["rtf"], "torch_rtf_real_width": e2e["wide"]["torch"]["rtf"],
    }


def write_results(out: Path, results: dict) -> None:
    for name in ("decode", "prefill", "vision", "bandwidth", "int4", "end_to_end"):
        (out / f"{name}.json").write_text(json.dumps(results[name], indent=1) + "\n")
    summary = summary_of(results)
    old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    if "memory_growth_pct" in old:  # written by make soak; keep it
        summary["memory_growth_pct"] = old["memory_growth_pct"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot_decode(out, results["decode"])
    (out / "README.md").write_text(_table(results, summary))


def _plot_decode(out: Path, decode: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the JSON has the numbers; plots need the bench extra
    lengths = sorted(decode["onnx_ms"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [decode["onnx_ms"][n] for n in lengths], "o-", label="ONNX Runtime (this project)")
    ax.plot(lengths, [decode["torch_ms"][n] for n in lengths], "s-", label="transformers sdpa + DynamicCache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached tokens")
    ax.set_ylabel("ms per decode step")
    s = decode["setup"]
    ax.set_title(f"decode step, hidden {s['hidden']}, {s['layers']} layers, {s['threads']} threads", fontsize=9)
    ax.legend()
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out / "decode_latency.png", dpi=100)
    plt.close(fig)


def _table(results: dict, summary: dict) -> str:
    d, s = results["decode"], results["decode"]["setup"]
    rows = [f"| decode step, cache {n} | {d['onnx_ms'][n]:.1f} ms | {d['torch_ms'][n]:.1f} ms | "
            f"{d['torch_ms'][n] / d['onnx_ms'][n]:.2f}x |" for n in sorted(d["onnx_ms"])]
    p, v = results["prefill"], results["vision"]
    rows.append(f"| chunk prefill ({p['setup']['new_tokens']} tokens onto {p['setup']['cache_tokens']}) | "
                f"{p['onnx_ms']:.0f} ms | {p['torch_ms']:.0f} ms | {p['torch_ms'] / p['onnx_ms']:.2f}x |")
    rows.append(f"| vision, 1 chunk {v['setup']['frame'][1]}x{v['setup']['frame'][0]} x2 frames | {v['onnx_ms']:.0f} ms | "
                f"{v['torch_ms']:.0f} ms | {v['torch_ms'] / v['onnx_ms']:.2f}x |")
    e = results["end_to_end"]
    for name in ("tiny", "wide"):
        rows.append(f"| end to end, {name} ({e[name]['setup']['video_seconds']} s clip) | RTF {e[name]['onnx']['rtf']:.2f} | "
                    f"RTF {e[name]['torch']['rtf']:.2f} | {e[name]['onnx']['rtf'] / e[name]['torch']['rtf']:.2f}x |")
    b = results["bandwidth"]
    return "\n".join([
        "# Benchmark results", "",
        f"Setup: {s['machine']}, {s['cores']} cores, {s['threads']} threads, {s['provider']}, {s['dtype']}; model: "
        f"hidden {s['hidden']}, {s['heads']}/{s['kv_heads']} heads, head_dim {s['head_dim']}, FFN {s['ffn']}, "
        f"vocab {s['vocab']}, {s['layers']} decoder layers, {s['vision_layers']} vision layers of width "
        f"{s['vision_hidden']}. RTF = seconds of video per second of wall time.", "",
        "| what | ONNX Runtime | transformers | speed-up |", "|---|---|---|---|", *rows, "",
        f"Memory copy bandwidth {b['copy_gbs']:.1f} GB/s; a decode step at {b['setup']['cache_tokens']} cached tokens "
        f"must read {b['decode_bytes'] / 1e9:.2f} GB: floor {b['decode_floor_ms']:.1f} ms, measured "
        f"{b['decode_ms']:.1f} ms ({summary['decode_vs_floor']:.2f}x the floor, {b['achieved_gbs']:.1f} GB/s).", "",
        f"What the machine allows: streaming reads (a fp32 GEMV over 512 MB) reach {b['read_gbs']:.1f} GB/s, so no "
        f"decode step at {b['setup']['cache_tokens']} tokens can take under {b['decode_read_floor_ms']:.1f} ms: at most "
        f"{b['decode_speedup_bound']:.2f}x faster than transformers. fp32 matrix products reach "
        f"{b['gemm_gflops']:.0f} GFLOP/s; the prefill ({b['setup']['prefill']}) is {b['prefill_flops'] / 1e9:.0f} "
        f"GFLOP, so it cannot take under {b['prefill_floor_ms']:.0f} ms: at most {b['prefill_speedup_bound']:.2f}x "
        f"faster than transformers (measured: {b['prefill_achieved_gflops']:.0f} GFLOP/s). The vision call is "
        f"{b['vision_flops'] / 1e9:.0f} GFLOP: floor {b['vision_floor_ms']:.0f} ms, measured {v['onnx_ms']:.0f} ms "
        f"({b['vision_vs_floor']:.2f}x the floor, {b['vision_achieved_gflops']:.0f} GFLOP/s); at most "
        f"{b['vision_speedup_bound']:.2f}x faster than transformers.", "",
        f"Decode flatness: {summary['decode_flatness']:.2f}x from {min(d['onnx_ms'])} to {max(d['onnx_ms'])} cached "
        "tokens.", "",
    ] + _int4_table(results))


def _int4_table(results: dict) -> list[str]:
    """int4 beside fp32, transformers and llama.cpp, same weights, same run."""
    q, d, e = results["int4"], results["decode"], results["end_to_end"]
    peer = q["llama_cpp"]
    f32, q40 = peer.get("f32_ms", {}), peer.get("q4_0_ms", {})

    def ms(table, n):
        value = table.get(n, table.get(str(n)))
        return f"{value:.1f} ms" if value else "-"

    rows = [f"| decode step, cache {n} | {d['onnx_ms'][n]:.1f} ms | {q['decode_ms'][n]:.1f} ms | "
            f"{d['onnx_ms'][n] / q['decode_ms'][n]:.2f}x | {d['torch_ms'][n]:.1f} ms | "
            f"{d['torch_ms'][n] / q['decode_ms'][n]:.2f}x | {ms(f32, n)} | {ms(q40, n)} |"
            for n in sorted(q["decode_ms"])]
    p = results["prefill"]
    rows.append(f"| chunk prefill ({p['setup']['new_tokens']} onto {p['setup']['cache_tokens']}) | "
                f"{p['onnx_ms']:.0f} ms | {q['prefill_ms']:.0f} ms | {p['onnx_ms'] / q['prefill_ms']:.2f}x | "
                f"{p['torch_ms']:.0f} ms | {p['torch_ms'] / q['prefill_ms']:.2f}x | | |")
    w, w4 = e["wide"], e["wide_int4"]
    rows.append(f"| end to end ({w['setup']['video_seconds']} s clip) | RTF {w['onnx']['rtf']:.2f} | RTF "
                f"{w4['onnx']['rtf']:.2f} | {w4['onnx']['rtf'] / w['onnx']['rtf']:.2f}x | "
                f"RTF {w['torch']['rtf']:.2f} | {w4['onnx']['rtf'] / w['torch']['rtf']:.2f}x | | |")
    r = q["resident_mib"]
    quality = q["quality"]
    peer_line = (f"llama.cpp: {peer['error']}" if "error" in peer else
                 f"llama.cpp {peer['setup'].get('version', '')}: the same weights converted by its own converter, "
                 f"{peer['setup'].get('threads')} threads; setup {json.dumps(peer['setup'])}")
    eight = ", ".join(q["scheme"]["eight_bit"]) or "nothing"
    ppl = "-" if quality["ppl_ratio"] is None else f"{quality['ppl_ratio']:.4f}"
    return [
        "## int4 weights", "",
        f"The same model with 4-bit weights ({q['scheme']['form']}, block {q['scheme']['block_size']}, "
        f"accuracy_level {q['scheme']['accuracy_level']}, at 8 bits: {eight}); activations, norms and the cache "
        f"fp32. Against the fp32 graphs (teacher forced, {quality['positions']} positions): mean KL "
        f"{quality['mean_kl']:.4f} nats, top-1 {quality['top1']:.1%} ({quality['top1_rule']}), ppl ratio {ppl}; "
        f"each matrix's rounding error {q['weight_rel_error']['mean']:.4f} (budget applies "
        f"{q['budget_applies']}).", "",
        "| what | ONNX fp32 | ONNX int4 | int4 vs fp32 | transformers fp32 | int4 vs transformers | llama.cpp F32 | "
        "llama.cpp Q4_0 |", "|---|---|---|---|---|---|---|---|", *rows, "",
        f"A decode step at {results['bandwidth']['setup']['cache_tokens']} cached tokens reads "
        f"{q['decode_bytes'] / 1e9:.2f} GB with int4 weights: floor {q['decode_read_floor_ms']:.1f} ms at the measured "
        f"{results['bandwidth']['read_gbs']:.1f} GB/s (achieved {q['achieved_gbs']:.1f} GB/s).", "",
        f"Resident memory, both decoder sessions loaded and run once: fp32 {r['fp32']['rss_mib']:.0f} MiB (weights "
        f"memory-mapped, shared), int4 {r['int4']['rss_mib']:.0f} MiB (one prepacked copy per session).", "",
        peer_line, "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
