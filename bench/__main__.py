"""make bench: speed against transformers, llama.cpp and what the machine allows (its floors), all in one run.

    python -m bench [--quick] [--results bench/results]

Writes one JSON per section, `summary.json`, PNG plots (with matplotlib) and `README.md` (a table) under
--results. Every number carries its setup: provider, dtype, threads, widths and depth, cache length, frame size.
--quick is the smoke version the tests run: tiny sizes, seconds, well-formed output only.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


from . import measure
from .models import build_exports

CACHE_LENGTHS = (256, 1024, 4096, 8192, 16384)
CHUNK_VISION_TOKENS = 720  # 1152 x 640 frames: (640/32) x (1152/32) merged tokens per 1-s chunk
CHUNK_TEXT_TOKENS = 20
ROUNDS = 5  # ours and theirs in turn, this many times: the machine's drift hits both
FLOOR_AT = 4096  # the cache length the README's floor sentence quotes


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
             "provider": "CPUExecutionProvider", "dtype": "fp32", "torch_attention": "sdpa",
             "rounds": 2 if args.quick else ROUNDS}
    results, started = {}, time.perf_counter()
    floors = measure.Floors(threads, args.quick)
    floors.probe("start")

    wide, quant = exports["wide"], exports["wide_int4"]
    count = setup["rounds"]
    lengths = (64, 256) if args.quick else CACHE_LENGTHS
    past = 256 if args.quick else 8192
    new = 24 if args.quick else CHUNK_VISION_TOKENS + CHUNK_TEXT_TOKENS
    if args.quick:
        peers = {"error": "not run by --quick"}
    else:  # before our models load: a first run builds the GGUF files from its own copy of the weights
        from .llama_cpp import open_peers

        print("llama.cpp (the peer): F32 and Q4_0 GGUF of the same weights, each in its own process", flush=True)
        peers = open_peers(wide.source, max(*lengths, past + new), threads, Path("build/bench/llama"))
    llama = peers.get("peers", {})
    model, int4, hf = wide.model(threads), quant.model(threads), wide.hf_model()
    names = ", ".join(["fp32", "int4", "transformers", *(f"llama.cpp {kind}" for kind in llama)])
    print(f"decode step at {lengths} cached tokens ({wide.describe()['model']}): {names} in turn", flush=True)
    decode = {}
    for n in lengths:
        for kind, peer in llama.items():
            peers["result"]["fill"][kind][n] = peer.fill(n)
        decode[n] = measure.rounds({"onnx": measure.onnx_step(model, n, 1), "int4": measure.onnx_step(int4, n, 1),
                                    "torch": measure.torch_step(hf, n, 1),
                                    **{f"llama_{kind}": measure.SelfTimed(peer.step) for kind, peer in llama.items()}},
                                   count)
    print(f"chunk prefill ({new} tokens onto {past}): {names} in turn", flush=True)
    for peer in llama.values():
        peer.fill(past)
    prefill = measure.rounds({"onnx": measure.onnx_step(model, past, new), "int4": measure.onnx_step(int4, past, new),
                              "torch": measure.torch_step(hf, past, new),
                              **{f"llama_{kind}": measure.SelfTimed(lambda p=peer: p.prefill(new))
                                 for kind, peer in llama.items()}}, count)
    grid = (4, 8) if args.quick else (40, 72)  # patches of a 640 x 1152 frame pair
    print("vision: ONNX Runtime, transformers in turn", flush=True)
    vision = measure.rounds({"onnx": measure.onnx_vision(model, *grid), "torch": measure.torch_vision(hf, *grid)},
                            count)
    del hf
    floors.probe("after the timed sections")
    results["decode"] = {"setup": {**setup, **wide.describe(), "new_tokens": 1}, **_compare(decode, "onnx", "torch")}
    results["prefill"] = {"setup": {**setup, **wide.describe(), "cache_tokens": past, "new_tokens": new},
                          **_compare(prefill, "onnx", "torch")}
    results["vision"] = {"setup": {**setup, **wide.describe(), "frame": [grid[0] * 16, grid[1] * 16], "frames": 2,
                                   "patch_grid": list(grid)}, **_compare(vision, "onnx", "torch")}
    results["int4"] = _int4(exports, int4, setup, decode, prefill, threads, peers)
    floors.probe("end")
    results["bandwidth"] = _floors(floors, model, int4, results, args.quick)
    del model, int4

    from .e2e import end_to_end

    print("end to end", flush=True)
    results["end_to_end"] = end_to_end(exports, threads, quick=args.quick)
    results["seconds"] = time.perf_counter() - started
    write_results(out, results)
    print(f"bench: {out} ({results['seconds']:.0f} s)")
    b = results["bandwidth"]
    if b["noisy"]:
        print(f"bench: noisy run: the first and last probes differ by {max(b['drift'].values()):.0%} (> 15%); "
              "quote a run that is not flagged")
    if b["below_floor"] and b["enforced"]:
        print("bench: FAILED: a step beat its floor, so a probe under-measured the machine: " + "; ".join(
            b["below_floor"]))
        return 1
    return 0


def _compare(times: dict, ours: str, theirs: str) -> dict:
    """Medians of both sides and the per-round speed-up of ours (times: {name: [ms]} or {length: {name: [ms]}})."""
    if ours in times:
        return {"onnx_ms": statistics.median(times[ours]), "torch_ms": statistics.median(times[theirs]),
                "speedup": measure.ratio(times[theirs], times[ours])}
    return {"onnx_ms": {n: statistics.median(t[ours]) for n, t in times.items()},
            "torch_ms": {n: statistics.median(t[theirs]) for n, t in times.items()},
            "speedup": {n: measure.ratio(t[theirs], t[ours]) for n, t in times.items()}}


def _int4(exports, model, setup: dict, decode: dict, prefill: dict, threads: int, peers: dict) -> dict:
    """The int4 export of the same model beside fp32, transformers and the peer a CPU user would pick instead,
    llama.cpp (F32 and Q4_0 GGUF of the same weights), all timed in the same rounds; resident memory of ours."""
    wide, quant = exports["wide"], exports["wide_int4"]
    lengths = sorted(decode)
    block = model.manifest["quantization"]["scheme"]["block_size"]
    out = {"setup": {**setup, **quant.describe(),
                     "dtype": f"int4 weights (MatMulNBits, block {block}, accuracy_level 4), fp32 activations "
                              "and cache"},
           **{key: model.manifest["quantization"][key] for key in ("scheme", "quality", "weight_rel_error",
                                                                   "budget_applies")},
           "decode_ms": {n: statistics.median(decode[n]["int4"]) for n in lengths},
           "vs_fp32": {n: measure.ratio(decode[n]["onnx"], decode[n]["int4"]) for n in lengths},
           "vs_torch": {n: measure.ratio(decode[n]["torch"], decode[n]["int4"]) for n in lengths},
           "prefill_ms": statistics.median(prefill["int4"]),
           "prefill_vs_fp32": measure.ratio(prefill["onnx"], prefill["int4"]),
           "prefill_vs_torch": measure.ratio(prefill["torch"], prefill["int4"])}
    print("resident memory", flush=True)
    out["resident_mib"] = {"fp32": measure.resident_mib(wide.graphs, threads),
                           "int4": measure.resident_mib(quant.graphs, threads)}
    if "error" in peers:
        out["llama_cpp"] = peers
        return out
    from .llama_cpp import close_peers

    peer = out["llama_cpp"] = close_peers(peers)
    peer["setup"]["timed"] = "in turn with ours, each step timed inside llama.cpp's process"
    for kind in ("f32", "q4_0"):
        times = {n: decode[n][f"llama_{kind}"] for n in lengths}
        peer[f"{kind}_ms"] = {n: statistics.median(t) for n, t in times.items()}
        peer["steps_ms"][kind] = {n: [round(ms, 2) for ms in t] for n, t in times.items()}
        peer[f"{kind}_prefill_ms"] = statistics.median(prefill[f"llama_{kind}"])
    out["vs_q4_0"] = {n: measure.ratio(decode[n]["llama_q4_0"], decode[n]["int4"]) for n in lengths}
    out["prefill_vs_q4_0"] = measure.ratio(prefill["llama_q4_0"], prefill["int4"])
    return out


def _floors(floors, model, int4, results: dict, quick: bool) -> dict:
    """What this machine allows at best: a decode step must stream its weights and cache from memory, a prefill and
    a vision call must do their multiply-adds. Floors divide by the best probe figure of the run; a step measured
    under its floor means a probe under-measured the machine (enforced unless --quick, whose tiny model sits in
    the caches). The int4 prefill has no floor here: with int8 products it may legitimately beat an fp32 rate."""
    decode, prefill, vision, q = results["decode"], results["prefill"], results["vision"], results["int4"]
    lengths = sorted(decode["onnx_ms"])
    out = {"setup": {**results["decode"]["setup"], "prefill": "{new_tokens} tokens onto {cache_tokens}".format(
        **prefill["setup"])}, **floors.report(), "enforced": not quick}
    steps = []  # (what, measured ms, floor ms)
    for name, m, ms in (("fp32", model, decode["onnx_ms"]), ("int4", int4, q["decode_ms"])):
        out[f"{name}_decode_bytes"] = {n: measure.decoder_bytes(m, n) for n in lengths}
        out[f"{name}_decode_floor_ms"] = {n: out[f"{name}_decode_bytes"][n] / floors.read / 1e6 for n in lengths}
        out[f"{name}_decode_vs_floor"] = {n: ms[n] / out[f"{name}_decode_floor_ms"][n] for n in lengths}
        steps += [(f"{name} decode step at {n}", ms[n], out[f"{name}_decode_floor_ms"][n]) for n in lengths]
    cache, new = prefill["setup"]["cache_tokens"], prefill["setup"]["new_tokens"]
    out["prefill_flops"] = measure.decoder_flops(model, cache, new)
    out["vision_flops"] = measure.vision_flops(model, *vision["setup"]["patch_grid"])
    for name, section in (("prefill", prefill), ("vision", vision)):
        floor = out[f"{name}_flops"] / floors.gemm / 1e6
        out |= {f"{name}_floor_ms": floor, f"{name}_vs_floor": section["onnx_ms"] / floor,
                f"{name}_speedup_bound": section["torch_ms"] / floor,
                f"{name}_achieved_gflops": out[f"{name}_flops"] / section["onnx_ms"] / 1e6}
        steps.append((f"fp32 {name}", section["onnx_ms"], floor))
    at = FLOOR_AT if FLOOR_AT in lengths else lengths[-1]
    out["floor_at"] = at
    out["decode_speedup_bound"] = decode["torch_ms"][at] / out["fp32_decode_floor_ms"][at]
    out["below_floor"] = [f"{what}: {ms:.1f} ms under its floor {floor:.1f} ms" for what, ms, floor in steps
                          if ms < floor]
    return out


def summary_of(results: dict) -> dict:
    decode, e2e, b, q = results["decode"], results["end_to_end"], results["bandwidth"], results["int4"]
    lengths = sorted(decode["onnx_ms"])
    at = b["floor_at"]
    return {
        "decode_ms": {str(n): decode["onnx_ms"][n] for n in lengths},
        "torch_decode_ms": {str(n): decode["torch_ms"][n] for n in lengths},
        "decode_speedup": {str(n): decode["speedup"][n]["median"] for n in lengths},
        "decode_flatness": decode["onnx_ms"][lengths[-1]] / decode["onnx_ms"][lengths[0]],
        "prefill_ms": results["prefill"]["onnx_ms"], "torch_prefill_ms": results["prefill"]["torch_ms"],
        "prefill_speedup": results["prefill"]["speedup"]["median"],
        "vision_ms_per_chunk": results["vision"]["onnx_ms"], "torch_vision_ms_per_chunk": results["vision"]["torch_ms"],
        "vision_speedup": results["vision"]["speedup"]["median"],
        "read_gbs": b["read_gbs"], "read_method": b["read_method"], "gemm_gflops": b["gemm_gflops"],
        "noisy": b["noisy"], "probe_drift": b["drift"], "below_floor": b["below_floor"], "floor_cache_tokens": at,
        "decode_read_floor_ms": b["fp32_decode_floor_ms"][at], "decode_vs_floor": b["fp32_decode_vs_floor"][at],
        "int4_decode_vs_floor": b["int4_decode_vs_floor"][at],
        **{key: b[key] for key in ("decode_speedup_bound", "prefill_floor_ms", "prefill_speedup_bound",
                                   "vision_floor_ms", "vision_vs_floor", "vision_speedup_bound")},
        "rtf": e2e["tiny"]["onnx"]["rtf"], "torch_rtf": e2e["tiny"]["torch"]["rtf"],
        "int4_decode_ms": {str(n): q["decode_ms"][n] for n in lengths},
        "int4_prefill_ms": q["prefill_ms"], "int4_prefill_vs_fp32": q["prefill_vs_fp32"]["median"],
        "rtf_real_width_int4": e2e["wide_int4"]["onnx"]["rtf"],
        "int4_resident_mib": q["resident_mib"]["int4"]["rss_mib"],
        "fp32_resident_mib": q["resident_mib"]["fp32"]["rss_mib"],
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


def _x(r: dict) -> str:
    """A per-round ratio: median (range)."""
    return f"{r['median']:.2f}x ({r['range'][0]:.2f}-{r['range'][1]:.2f})"


def _table(results: dict, summary: dict) -> str:
    d, s = results["decode"], results["decode"]["setup"]
    rows = [f"| decode step, cache {n} | {d['onnx_ms'][n]:.1f} ms | {d['torch_ms'][n]:.1f} ms | {_x(d['speedup'][n])} |"
            for n in sorted(d["onnx_ms"])]
    p, v = results["prefill"], results["vision"]
    rows.append(f"| chunk prefill ({p['setup']['new_tokens']} tokens onto {p['setup']['cache_tokens']}) | "
                f"{p['onnx_ms']:.0f} ms | {p['torch_ms']:.0f} ms | {_x(p['speedup'])} |")
    rows.append(f"| vision, 1 chunk {v['setup']['frame'][1]}x{v['setup']['frame'][0]} x2 frames | "
                f"{v['onnx_ms']:.0f} ms | {v['torch_ms']:.0f} ms | {_x(v['speedup'])} |")
    e = results["end_to_end"]
    for name in ("tiny", "wide"):
        run = e[name]
        rows.append(f"| end to end, {name} ({run['setup']['video_seconds']} s clip) | RTF {run['onnx']['rtf']:.2f} | "
                    f"RTF {run['torch']['rtf']:.2f} | {run['onnx']['rtf'] / run['torch']['rtf']:.2f}x |")
    b = results["bandwidth"]
    probes = "; ".join(f"{p['when']}: " + ", ".join(f"{k} {v:.1f}" for k, v in p["read_gbs"].items())
                       + f" GB/s, {p['gemm_gflops']:.0f} GFLOP/s" for p in b["probes"])
    at = b["floor_at"]
    verdict = ("NOISY RUN: the first and last probes differ by more than 15%; do not quote it" if b["noisy"] else
               "not noisy (first and last probes within 15%)")
    below = ("Steps under their floor (a probe under-measured the machine): " + "; ".join(b["below_floor"])
             if b["below_floor"] else "No step ran under its floor.")
    return "\n".join([
        "# Benchmark results", "",
        f"Setup: {s['machine']}, {s['cores']} cores, {s['threads']} threads, {s['provider']}, {s['dtype']}; model: "
        f"hidden {s['hidden']}, {s['heads']}/{s['kv_heads']} heads, head_dim {s['head_dim']}, FFN {s['ffn']}, "
        f"vocab {s['vocab']}, {s['layers']} decoder layers, {s['vision_layers']} vision layers of width "
        f"{s['vision_hidden']}. RTF = seconds of video per second of wall time. Ours and theirs timed in turn, "
        f"{s['rounds']} rounds: medians, and the speed-up as the median of the per-round ratios (range).", "",
        "| what | ONNX Runtime | transformers | speed-up |", "|---|---|---|---|", *rows, "",
        f"Probes ({verdict}): {probes}. Floors divide by the best: read {b['read_gbs']:.1f} GB/s ({b['read_method']}), "
        f"fp32 products {b['gemm_gflops']:.0f} GFLOP/s. {below}", "",
        f"A decode step at {at} cached tokens must read {b['fp32_decode_bytes'][at] / 1e9:.2f} GB: floor "
        f"{b['fp32_decode_floor_ms'][at]:.1f} ms, measured {d['onnx_ms'][at]:.1f} ms "
        f"({b['fp32_decode_vs_floor'][at]:.2f}x the floor); so at most {b['decode_speedup_bound']:.2f}x faster than "
        f"transformers. The prefill ({b['setup']['prefill']}) is {b['prefill_flops'] / 1e9:.0f} GFLOP: floor "
        f"{b['prefill_floor_ms']:.0f} ms, measured {p['onnx_ms']:.0f} ms ({b['prefill_vs_floor']:.2f}x; at most "
        f"{b['prefill_speedup_bound']:.2f}x faster than transformers). The vision call is "
        f"{b['vision_flops'] / 1e9:.0f} GFLOP: floor {b['vision_floor_ms']:.0f} ms, measured {v['onnx_ms']:.0f} ms "
        f"({b['vision_vs_floor']:.2f}x the floor); at most {b['vision_speedup_bound']:.2f}x faster than "
        "transformers.", "",
        f"Decode flatness: {summary['decode_flatness']:.2f}x from {min(d['onnx_ms'])} to {max(d['onnx_ms'])} cached "
        "tokens.", "",
    ] + _int4_table(results))


def _int4_table(results: dict) -> list[str]:
    """int4 beside fp32, transformers and llama.cpp, same weights, same run."""
    q, d, e, b = results["int4"], results["decode"], results["end_to_end"], results["bandwidth"]
    peer = q["llama_cpp"]
    f32, q40 = peer.get("f32_ms", {}), peer.get("q4_0_ms", {})

    def ms(value):
        return "-" if value is None else f"{value:.1f} ms"

    rows = [f"| decode step, cache {n} | {d['onnx_ms'][n]:.1f} ms | {q['decode_ms'][n]:.1f} ms | "
            f"{_x(q['vs_fp32'][n])} | {d['torch_ms'][n]:.1f} ms | {_x(q['vs_torch'][n])} | "
            f"{b['int4_decode_vs_floor'][n]:.2f}x | {ms(f32.get(n))} | {ms(q40.get(n))} | "
            f"{_x(q['vs_q4_0'][n]) if 'vs_q4_0' in q else '-'} |" for n in sorted(q["decode_ms"])]
    p = results["prefill"]
    rows.append(f"| chunk prefill ({p['setup']['new_tokens']} onto {p['setup']['cache_tokens']}) | "
                f"{p['onnx_ms']:.0f} ms | {q['prefill_ms']:.0f} ms | {_x(q['prefill_vs_fp32'])} | "
                f"{p['torch_ms']:.0f} ms | {_x(q['prefill_vs_torch'])} | | {ms(peer.get('f32_prefill_ms'))} | "
                f"{ms(peer.get('q4_0_prefill_ms'))} | {_x(q['prefill_vs_q4_0']) if 'prefill_vs_q4_0' in q else '-'} |")
    w, w4 = e["wide"], e["wide_int4"]
    rows.append(f"| end to end ({w['setup']['video_seconds']} s clip) | RTF {w['onnx']['rtf']:.2f} | RTF "
                f"{w4['onnx']['rtf']:.2f} | {w4['onnx']['rtf'] / w['onnx']['rtf']:.2f}x | "
                f"RTF {w['torch']['rtf']:.2f} | {w4['onnx']['rtf'] / w['torch']['rtf']:.2f}x | | | | |")
    r = q["resident_mib"]
    quality = q["quality"]
    peer_line = (f"llama.cpp: {peer['error']}" if "error" in peer else
                 f"llama.cpp {peer['setup'].get('version', '')}: the same weights converted by its own converter, "
                 f"{peer['setup'].get('threads')} threads, in its own process, timed in turn with ours; "
                 f"setup {json.dumps(peer['setup'])}")
    eight = ", ".join(q["scheme"]["eight_bit"]) or "nothing"
    ppl = "-" if quality["ppl_ratio"] is None else f"{quality['ppl_ratio']:.4f}"
    return [
        "## int4 weights", "",
        f"The same model with 4-bit weights ({q['scheme']['form']}, block {q['scheme']['block_size']}, "
        f"accuracy_level {q['scheme']['accuracy_level']}, at 8 bits: {eight}); activations, norms and the cache "
        f"fp32. Against the fp32 graphs (teacher forced, {quality['positions']} positions): mean KL "
        f"{quality['mean_kl']:.4f} nats, top-1 {quality['top1']:.1%} ({quality['top1_rule']}), ppl ratio {ppl}; "
        f"each matrix's rounding error {q['weight_rel_error']['mean']:.4f} (budget applies "
        f"{q['budget_applies']}). Timed in the same rounds as fp32, transformers and llama.cpp.", "",
        "| what | ONNX fp32 | ONNX int4 | int4 vs fp32 | transformers fp32 | int4 vs transformers | "
        "int4 vs its floor | llama.cpp F32 | llama.cpp Q4_0 | int4 vs Q4_0 |", "|---" * 10 + "|",
        *rows, "",
        f"Resident memory, both decoder sessions loaded and run once: fp32 {r['fp32']['rss_mib']:.0f} MiB (weights "
        f"memory-mapped, shared), int4 {r['int4']['rss_mib']:.0f} MiB (one prepacked copy per session).", "",
        peer_line, "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
