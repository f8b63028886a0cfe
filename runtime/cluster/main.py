"""Starting the cluster: Ray started here or joined, one engine replica per device, runtime.serve's app in front."""

import os
import sys
import time

from .. import stream as cli
from ..manifest import Manifest
from ..serve import options
from ..serve.startup import check_limits, run_app
from ..serve.startup import main as serve_main


def parse_args(argv=None):
    p = options.parser("python -m runtime.cluster", "The commentary server spread over engine replicas on Ray.")
    g = p.add_argument_group("cluster (--max-streams is per replica here)")
    g.add_argument("--replicas", type=int, help="engine replicas (default: one per GPU of the Ray cluster, else 1)")
    g.add_argument("--address", help="join this running Ray cluster ('auto': the one this machine belongs to); "
                                     "default: start Ray on this machine for this process")
    g.add_argument("--gpus-per-replica", type=float,
                   help="GPUs each replica reserves (default 1 where the Ray cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPUs each replica reserves from Ray (default 1; its ONNX Runtime threads: --threads)")
    g.add_argument("--ray-cpus", type=int, help="CPUs of the Ray instance started here (default: all)")
    g.add_argument("--object-store-mb", type=int, default=256,
                   help="object store of the Ray instance started here, MB (default 256: only uploads pass it)")
    g.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too (off by default)")
    g.add_argument("--start-timeout", type=float, default=600,
                   help="seconds to wait for every replica to load its graphs (default 600)")
    return p.parse_args(argv)


async def run(args) -> None:
    check_limits(args)
    manifest = Manifest.load(cli.find_graphs(args.graphs))  # the replicas load the same path on their nodes
    if args.replicas is not None and args.replicas < 1:
        raise cli.UsageError("--replicas must be >= 1")
    try:
        import ray
    except ImportError:
        raise cli.UsageError("runtime.cluster needs Ray: pip install -e '.[cluster]'") from None
    from .ingress import Cluster, ReplicaError, ReplicaState
    from .replica import Replica

    began = time.perf_counter()
    if args.address:
        ray.init(address=args.address, log_to_driver=True, logging_level="WARNING")
    else:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=args.dashboard, log_to_driver=True,
                 object_store_memory=args.object_store_mb << 20, logging_level="WARNING")
    try:
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
        count = args.replicas or max(1, int(gpus))
        per_gpu = args.gpus_per_replica if args.gpus_per_replica is not None else (1 if gpus else 0)
        for what, each, has in (("GPU", per_gpu, gpus), ("CPU", args.cpus_per_replica, cpus)):
            if each and count * each > has:  # the replicas beyond them would wait for them forever
                raise cli.UsageError(f"{count} replica(s) x {each:g} {what}(s) need {count * each:g}; the Ray cluster "
                                     f"has {has:g} (--replicas, --{what.lower()}s-per-replica)")
        # Ray restarts a replica that dies, as often as it takes (max_restarts=-1); a call in flight is not retried:
        # its stream is lost with the replica (ingress.py). "poll" and "hello" run on threads of their own; the
        # other calls run one at a time, in the order they were sent.
        actor = ray.remote(concurrency_groups={"poll": 1, "hello": 1}, max_restarts=-1, max_task_retries=0)(Replica)
        replicas = []
        for k in range(count):
            name = f"qwen3vl-{os.getpid()}-{k}"
            handle = actor.options(name=name, num_cpus=args.cpus_per_replica, num_gpus=per_gpu).remote(vars(args),
                                                                                                     name)
            replicas.append(ReplicaState(name, handle))
        cluster = Cluster(replicas)
        try:
            await cluster.start(args.start_timeout)
        except ReplicaError as error:
            raise cli.UsageError(str(error)) from None
        total = sum(r.max_streams for r in replicas)
        print(f"{count} replica(s) ready in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
        await run_app(args, manifest, cluster, total,
                      f"{count} replica(s) on Ray, at most {total} stream(s)")
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    return serve_main(argv, parse_args, run)
