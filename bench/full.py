"""make bench-full: the whole model in int4 against llama.cpp's Q4_0 of the same weights, in one run.

    python -m bench.full [--model Qwen3-VL-4B] [--lengths 256 1024 4096] [--prefill 740] [--rounds 5]

`make bench` runs the real widths with 4 layers, which fit any run; users run the whole model, so this runs it:
the int4 export (random weights, `QUANT=int4`, reused when up to date) and llama.cpp's Q4_0, made by llama.cpp's
own tools from the same weights (converted to F16, whose file fits this machine where F32 would not, then
quantized), both with the same threads. Decode steps at each cached length and a `--prefill`-token fill onto the
longest are timed in turn, ours then llama.cpp's, `--rounds` times (each llama.cpp step timed inside its process);
ratios are per-round medians with their range. The machine's read floor is probed before and after (the best
figure of the run, as in `make bench`). Writes `full.json` and `full.md` under --results.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from export.pipeline import ExportOptions

from . import measure
from .llama_cpp import close_peers, open_peers
from .models import BenchModel, _export


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.full")
    p.add_argument("--model", default="Qwen3-VL-4B", help="what `make export` takes (random weights)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--prefill", type=int, default=740, help="new tokens of the timed fill onto the longest length")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quant-block", type=int, help="weights per int4 scale of our export (default: make export's)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime and llama.cpp threads (0 = all cores)")
    p.add_argument("--root", default="build/bench-full", help="where the exports and GGUF files are kept")
    p.add_argument("--results", default="bench/results")
    args = p.parse_args(argv)
    threads, lengths, root = args.threads or os.cpu_count(), sorted(set(args.lengths)), Path(args.root)
    started = time.perf_counter()
    print(f"{args.model} int4 (random weights): the export, reused when up to date", flush=True)
    bench = BenchModel(_export(ExportOptions(args.model, root / f"{args.model}-int4", random_weights=True,
                                             verify=False, quant="int4", quant_block=args.quant_block),
                               log=print), args.model)
    print("llama.cpp: F16 GGUF of the same weights, then Q4_0", flush=True)
    peers = open_peers(args.model, lengths[-1] + args.prefill, threads, root / "llama", kinds=("q4_0",), base="f16")
    if "error" in peers:
        print(f"bench.full: llama.cpp is not available: {peers['error']}")
        return 1
    floors = measure.Floors(threads, quick=False)
    floors.probe("start")
    model, peer = bench.model(threads), peers["peers"]["q4_0"]
    block = model.manifest["quantization"]["scheme"]["block_size"]
    decode, fills = {}, {}
    for n in lengths:
        print(f"decode at {n} cached tokens: int4 and llama.cpp Q4_0 in turn", flush=True)
        fills[n] = peer.fill(n)
        decode[n] = measure.rounds({"int4": measure.onnx_step(model, n, 1),
                                    "llama_q4_0": measure.SelfTimed(peer.step)}, args.rounds)
    print(f"prefill of {args.prefill} tokens onto {lengths[-1]}: int4 and llama.cpp Q4_0 in turn", flush=True)
    prefill = measure.rounds({"int4": measure.onnx_step(model, lengths[-1], args.prefill),
                              "llama_q4_0": measure.SelfTimed(lambda: peer.prefill(args.prefill))}, args.rounds)
    bytes_at = {n: measure.decoder_bytes(model, n) for n in lengths}
    del model
    print("resident memory", flush=True)
    resident = measure.resident_mib(bench.graphs, threads)
    floors.probe("end")
    llama = close_peers(peers)
    result = {"setup": {**bench.describe(), "threads": threads, "rounds": args.rounds, "weights": "random",
                        "ours": f"ONNX Runtime CPU, int4 MatMulNBits (block {block}, accuracy_level 4), fp32 cache",
                        "llama_cpp": llama["setup"]},
              "decode_ms": {n: {k: statistics.median(t) for k, t in decode[n].items()} for n in lengths},
              "decode_vs_q4_0": {n: measure.ratio(decode[n]["llama_q4_0"], decode[n]["int4"]) for n in lengths},
              "prefill_tokens": args.prefill, "prefill_onto": lengths[-1],
              "prefill_ms": {k: statistics.median(t) for k, t in prefill.items()},
              "prefill_vs_q4_0": measure.ratio(prefill["llama_q4_0"], prefill["int4"]),
              "times_ms": {"decode": decode, "prefill": prefill}, "llama_fills": fills,
              "resident_mib": {"int4": resident["rss_mib"], "llama_q4_0": llama["rss"]["q4_0"]},
              "gguf_bytes": llama["gguf_bytes"], "llama_logit_check": llama["logit_check"],
              "floors": floors.report()}
    result["int4_decode_floor_ms"] = {n: bytes_at[n] / floors.read / 1e6 for n in lengths}
    result["int4_decode_vs_floor"] = {n: result["decode_ms"][n]["int4"] / result["int4_decode_floor_ms"][n]
                                      for n in lengths}
    result["seconds"] = time.perf_counter() - started
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "full.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out / "full.md").write_text(table(result))
    print(table(result))
    return 0


def table(r: dict) -> str:
    s, x = r["setup"], lambda q: f"{q['median']:.2f}x ({q['range'][0]:.2f}-{q['range'][1]:.2f})"
    rows = [f"| decode step, cache {n} | {r['decode_ms'][n]['int4']:.1f} ms | {r['decode_ms'][n]['llama_q4_0']:.1f} ms "
            f"| {x(r['decode_vs_q4_0'][n])} | {r['int4_decode_vs_floor'][n]:.2f}x |" for n in r["decode_ms"]]
    rows.append(f"| prefill, {r['prefill_tokens']} tokens onto {r['prefill_onto']} | {r['prefill_ms']['int4']:.0f} ms "
                f"| {r['prefill_ms']['llama_q4_0']:.0f} ms | {x(r['prefill_vs_q4_0'])} | |")
    f = r["floors"]
    return "\n".join([
        f"# {s['model']}: int4 against llama.cpp Q4_0, same weights, one run", "",
        f"{s['layers']} decoder layers, hidden {s['hidden']}, vocab {s['vocab']}, random weights; {s['threads']} "
        f"threads each; timed in turn, {s['rounds']} rounds (medians; ratios: median of the per-round ratios, "
        f"range). Ours: {s['ours']}. llama.cpp {s['llama_cpp']['llama_cpp_python']}: {s['llama_cpp']['converter']}, "
        f"its defaults (F16 cache, flash attention {s['llama_cpp'].get('flash_attn', '?')}).", "",
        "| what | ONNX int4 | llama.cpp Q4_0 | int4 speed-up | int4 vs its read floor |", "|---|---|---|---|---|",
        *rows, "",
        f"Read floor: the best probe of the run, {f['read_gbs']:.1f} GB/s ({f['read_method']}; "
        f"{'NOISY: the probes differ by more than 15%' if f['noisy'] else 'probes within 15%'}). Resident memory: "
        f"int4 {r['resident_mib']['int4']:.0f} MiB (both decoder sessions), llama.cpp Q4_0 "
        f"{(r['resident_mib']['llama_q4_0'].get('context') or 0) / 2**20:.0f} MiB (model and context). "
        f"{r['seconds'] / 60:.0f} minutes.", ""])


if __name__ == "__main__":
    raise SystemExit(main())
