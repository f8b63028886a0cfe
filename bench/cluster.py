"""The cluster against the one-process server, on this machine: `python -m bench.cluster [--seconds 20]`.

The same N live streams of micro (a clip of its world played in real time) served by `python -m runtime.serve`,
by `python -m runtime.cluster --replicas 1` and `--replicas 2`, in alternation, twice: cues per second, lag,
dropped chunks, start-up time and resident memory of the whole process tree (Ray's daemons and replicas
included). On 2 cores two replicas cannot beat one: they split the same cores. Writes cluster.json.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from .streams import serve_run

SETUPS = {"runtime.serve": 0, "cluster, 1 replica": 1, "cluster, 2 replicas": 2}  # replicas (0: no cluster)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--results", default="bench/results")
    args = p.parse_args(argv)
    from export.pipeline import ExportOptions, run
    from runtime.sample import write_world_clip

    root = Path("build/bench")
    micro = run(ExportOptions("micro", root / "micro", verify=False), log=lambda *_: None)
    clip, _ = write_world_clip(root / f"world-{int(args.seconds)}s.mp4", args.seconds, seed=5)
    threads = os.cpu_count()
    runs = {name: [] for name in SETUPS}
    for _ in range(args.rounds):
        for name, replicas in SETUPS.items():
            module, flags = "runtime.serve", ()
            if replicas:  # each replica gets its share of the cores (--threads) and of the streams (--max-streams)
                module = "runtime.cluster"
                flags = ("--replicas", str(replicas), "--ray-cpus", str(threads), "--threads",
                         str(max(1, threads // replicas)), "--max-streams", str(-(-args.streams // replicas)))
            row = serve_run(micro, clip, args.streams, True, threads, args.seconds, module, flags)
            print(f"{name}: start {row['start_s']:.1f} s, memory {row['idle_mib']:.0f} -> {row['peak_mib']:.0f} MiB, "
                  f"lag {row['lag_median']} / p90 {row['lag_p90']}, dropped {sum(d or 0 for d in row['dropped'])}, "
                  f"media/s {row['media_per_wall_second']:.2f}", flush=True)
            runs[name].append(row)
    summary = {name: {key: statistics.median(r[key] for r in rows) for key in
                      ("start_s", "idle_mib", "peak_mib", "lag_median", "lag_p90", "media_per_wall_second")}
               | {"dropped": [sum(d or 0 for d in r["dropped"]) for r in rows]} for name, rows in runs.items()}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    result = {"setup": {"cores": os.cpu_count(), "streams": args.streams, "seconds": args.seconds,
                        "rounds": args.rounds, "model": "micro"}, "summary": summary, "runs": runs}
    (out / "cluster.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
