"""make soak: resident memory over a long synthetic stream with the tiny model; it must stay flat.

    python -m bench.soak [--minutes 60] [--results bench/results]

Samples the process's resident memory after every chunk and the retained context size; growth is the rise
from the end of warm-up (the first 10% of the stream, once the windows are full) to the peak of the rest.
"""

import argparse
import json
import time
from pathlib import Path

from runtime.commentator import Commentator, StreamConfig
from runtime.sample import write_clip

from .e2e import GREEDY, _chunks
from .models import build_exports


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak")
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--results", default="bench/results")
    args = p.parse_args(argv)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    seconds = int(args.minutes * 60)
    tiny = build_exports(Path("build/bench"), quick=True)["tiny"]
    model = tiny.model()
    clip = write_clip(Path("build/bench") / f"soak-{seconds}s.mp4", seconds, 320, 180, fps=2)
    commentator = Commentator(model, StreamConfig(sampling=GREEDY))
    samples, start = [], time.perf_counter()
    for chunk in _chunks(model, clip, seconds):
        reply = commentator.step(chunk)
        samples.append({"video_s": reply.end, "wall_s": time.perf_counter() - start, "rss_mib": rss_mib(),
                        "cache_tokens": reply.cache_tokens, "chunk_ms": sum(reply.seconds.values()) * 1e3})
    warm = max(1, len(samples) // 10)
    base = samples[warm - 1]["rss_mib"]
    growth = (max(s["rss_mib"] for s in samples[warm:]) - base) / base * 100
    result = {"setup": {**tiny.describe(), "minutes": args.minutes, "frame": [320, 180], "windows": "16/16/512/512"},
              "memory_growth_pct": growth, "max_cache_tokens": max(s["cache_tokens"] for s in samples),
              "samples": samples}
    (out / "soak.json").write_text(json.dumps(result) + "\n")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["memory_growth_pct"] = growth
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    _plot(out, samples)
    print(f"soak: {len(samples)} chunks, memory growth after warm-up {growth:.2f}%, "
          f"cache at most {result['max_cache_tokens']} tokens")
    return 0


def _plot(out: Path, samples: list) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, left = plt.subplots(figsize=(7, 4))
    minutes = [s["video_s"] / 60 for s in samples]
    left.plot(minutes, [s["rss_mib"] for s in samples], label="resident memory (MiB)")
    left.set_xlabel("video time (min)")
    left.set_ylabel("MiB")
    right = left.twinx()
    right.plot(minutes, [s["cache_tokens"] for s in samples], color="tab:orange", label="retained tokens")
    right.set_ylabel("tokens")
    left.set_title("tiny model, memory and cache over a long stream", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "memory_over_time.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
