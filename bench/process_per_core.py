"""EASIER's train step as one single-threaded process per core, data parallel through
`jax.distributed` (gloo on localhost): what that layout costs, all-reduce included.

    python bench/process_per_core.py                 # 2 processes, global batch 128
    python bench/process_per_core.py --no-allreduce  # each process alone on its half

Each process is pinned to one core, runs XLA single-threaded on one host device, and
steps `Trainer`'s jitted EASIER step (statistics on; `--no-statistics` off) on its shard
of the global batch of resnet18_cifar (width 64, 32 px, float32). With `--no-allreduce`
the processes run the same step each on a mesh of its own device (no collective): the
compute alone, an upper bound of what the layout could give. The processes run at the
same time; each prints the median seconds per step of its timed steps, and the last
line is one JSON object with every process's median.

The `official` and `jaxprune` sides to compare with: `python bench/train_step.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(rank: int, n: int, port: int, batch: int, steps: int, allreduce: bool,
           statistics: bool) -> None:
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=1 "
                               "--xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1")
    sys.path.insert(0, str(ROOT))
    from jaxprune import distributed
    if allreduce:
        distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=rank)
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import models
    from jaxprune.config import TrainConfig
    from jaxprune.methods.easier.method import EntropyHooks
    from jaxprune.train import Trainer, make_mesh
    mesh = make_mesh()
    m = models.create("resnet18_cifar", num_classes=10, seed=0, width=64)
    trainer = Trainer(m, TrainConfig(), steps_per_epoch=1000, mesh=mesh,
                      hooks=EntropyHooks() if statistics else None)
    trainer.start_round()
    rng = np.random.default_rng(rank)
    local = batch // n
    data = {"image": rng.normal(size=(local, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, local).astype(np.int32),
            "mask": np.ones(local, np.float32)}
    sharding = NamedSharding(mesh, P("data"))
    data = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in data.items()}

    def step():
        trainer.train_step(data)
        jax.block_until_ready(trainer.params)
    step()
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print("RESULT" + json.dumps({"rank": rank, "median_s": sorted(times)[len(times) // 2],
                                 "steps_s": [round(t, 4) for t in times]}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--no-allreduce", action="store_true",
                   help="each process alone on its shard: the compute without the collective")
    p.add_argument("--no-statistics", action="store_true")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)   # a worker
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank is not None:
        worker(args.rank, args.processes, args.port, args.batch, args.steps,
               not args.no_allreduce, not args.no_statistics)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f"--processes={args.processes}", f"--batch={args.batch}", f"--steps={args.steps}",
             f"--port={port}"] + (["--no-allreduce"] if args.no_allreduce else []) + \
        (["--no-statistics"] if args.no_statistics else [])
    procs = [subprocess.Popen([sys.executable, __file__, f"--rank={r}", *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(args.processes)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("RESULT")]
        if proc.returncode or not lines:
            print(out[-3000:])
            return 1
        results.append(json.loads(lines[-1][len("RESULT"):]))
    for r in results:
        print(f"process {r['rank']}: {r['median_s']:.3f} s/step (median of {args.steps})")
    print(json.dumps({"processes": args.processes, "global_batch": args.batch,
                      "allreduce": not args.no_allreduce,
                      "statistics": not args.no_statistics,
                      "median_s": [round(r["median_s"], 4) for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
