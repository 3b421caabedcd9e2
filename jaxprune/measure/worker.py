"""The timing process: `python -m jaxprune.measure.worker SPEC.json`.

Builds every workload of the spec (all of one runtime), warms each up, and prints one
JSON line: the threads, the device, and which of jax and torch this process imported.
Then, for each line it reads on stdin, it times one burst (`repeats` calls of each
workload, the workloads taking turns call by call) and prints one JSON line of the times
per workload; it exits at the end of stdin. The measuring process keeps several workers
waiting on stdin and lets one burst run at a time, so the workloads alternate burst by
burst with no other timing running beside them. Those answers are the only lines on its
stdout: whatever else is printed there goes to stderr.

It imports nothing of the other runtime: for torch, JAX never enters the process; for
JAX, the XLA flags are set before JAX is imported.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time


def _prepare(runtime: str, threads: int, devices: int | None) -> str:
    """Thread settings before the runtime is imported; returns the device's name."""
    if runtime == "jax":
        flag = "--xla_force_host_platform_device_count"
        flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith(flag))
        os.environ["XLA_FLAGS"] = f"{flags} {flag}={devices or threads}".strip()
        import jax
        return jax.devices()[0].device_kind
    import torch
    torch.set_num_threads(threads)
    return "cpu"  # torch here is the CPU build


def _factory(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _threads(runtime: str) -> int:
    if runtime == "torch":
        import torch
        return torch.get_num_threads()
    import jax
    return jax.device_count()


def main(argv: list[str]) -> int:
    # the answers go to stdout as it was; anything else written there (a library's print,
    # native code writing to fd 1) goes to stderr, so every stdout line is one answer
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    spec = json.loads(open(argv[0]).read())
    runtime, workloads = spec["runtime"], spec["workloads"]
    devices = {w.get("devices") for w in workloads}
    device = _prepare(runtime, spec["threads"], devices.pop() if len(devices) == 1 else None)
    steps = [_factory(w["factory"])(**w["args"]) for w in workloads]
    for step in steps:
        for _ in range(spec["warmup"]):
            step()
    print(json.dumps({
        "runtime": runtime, "device": device, "threads": _threads(runtime),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "imported": {m: m in sys.modules for m in ("jax", "torch")}}), file=answers, flush=True)
    for _ in sys.stdin:  # one line: one burst
        times = [[] for _ in steps]
        for _ in range(spec["repeats"]):
            for step, out in zip(steps, times):
                t0 = time.perf_counter()
                step()
                out.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps({"results": [{"name": w["name"], "times_ms": t}
                                      for w, t in zip(workloads, times)]}), file=answers,
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
