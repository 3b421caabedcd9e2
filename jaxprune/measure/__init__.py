"""Every latency and throughput figure of jaxprune is measured here, so that a skeptic can
rerun it and get the same answer.

    from jaxprune import measure
    dense = measure.Workload("dense", "torch", "jaxprune.measure.workloads:torch_original",
                             {"arch": "resnet18", "batch": 1, "input_size": [224, 224]})
    fused = measure.Workload("fused", "torch", "jaxprune.measure.workloads:torch_program",
                             {"folder": "runs/x/export", "batch": 1, "input_size": [224, 224]})
    timings = measure.measure([dense, fused], rounds=3, bursts=5)  # alternating, a process each
    timings["fused"].median_ms, timings["fused"].spread_ms    # ms per call, (min, max) of bursts

The rules (each one closes a way an earlier figure went wrong):

* Each runtime runs in a fresh process of its own (`python -m jaxprune.measure.worker`):
  a torch workload never shares a process with JAX (the worker for torch never imports
  it, and reports the modules it loaded, so tests can check), and XLA's and torch's
  thread pools never compete inside one process.
* Thread counts are fixed and recorded: torch gets `threads` intra-op threads; JAX gets
  `devices` XLA host devices (`--xla_force_host_platform_device_count`, one per core by
  default on CPU, as `run.py` runs). The worker warms up (compile, caches) before it times.
* `measure` with `separate=True` (the default) runs every workload in its own process,
  fresh for each of `rounds` rounds. Within a round the processes are built and warmed
  up one after the other and stay alive together (memory: one process per workload),
  then take turns `bursts` times: one process times `repeats` calls while the others
  wait idle. The turns go runtime by runtime, so that the workloads a ratio compares
  follow each other, and the order reverses every other burst (A B, B A, ...), so that a
  steady drift favours neither side. A machine whose speed drifts within seconds (a
  shared virtual machine does) then hits both sides of a ratio more alike, and
  `Timings.paired`, the ratio burst by burst, is less exposed to it than a ratio of
  medians. With `separate=False` the workloads of one runtime share one process per
  round and alternate call by call inside it (for the many small candidates of a cost
  model, where a process each would cost minutes).
* A figure is the median over bursts of each burst's median; `spread_ms` is the (min,
  max) of the burst medians (with `bursts=1`, one burst per round). `Timings.command`
  reruns the same measurement (`python -m jaxprune.measure SPEC.json`) when the spec was
  saved.
* A piece of a model timed on its own (a merge candidate, a latency table's segment) pays
  its runtime's per-call overhead on every call, where the whole model pays it once: its
  `call_overhead` workload, timed in the same processes, is taken off (`in_model_ms`).

A workload is data: a factory `module:function` that the worker imports and calls with
`args` to get a zero-argument step, which runs one call to completion (JAX results are
blocked on, torch runs under `no_grad` or steps its optimizer). `workloads.py` has the
project's factories; benchmarks add their own (bench/).
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from jaxprune.errors import UserError

RUNTIMES = ("jax", "torch")
WORKER = "jaxprune.measure.worker"
ROOT = Path(__file__).resolve().parents[2]


def default_threads() -> int:
    """The cores this process may use: torch's threads and JAX's host devices by default."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Workload:
    """One thing to time: `factory(**args)` returns the step; `runtime` says which library
    the worker may import (jax or torch, never both)."""
    name: str
    runtime: str
    factory: str
    args: dict
    devices: int | None = None   # JAX: XLA host devices (None: one per core); torch: unused

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise UserError(f"workload {self.name!r}: runtime must be one of {RUNTIMES}, "
                            f"got {self.runtime!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Timing:
    """The measured time per call of one workload (milliseconds)."""
    name: str
    runtime: str
    median_ms: float                  # median over bursts of each burst's median
    spread_ms: tuple[float, float]    # (min, max) of the burst medians
    burst_medians_ms: list[float]     # one per burst, in time order (rounds x bursts)
    repeats: int                      # timed calls per burst
    threads: int                      # torch intra-op threads, or JAX host devices
    device: str
    imported: dict                    # {"jax": bool, "torch": bool}: what its process loaded

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Timings:
    """The timings of one `measure` call, by workload name, and how to rerun it."""
    timings: dict[str, Timing]
    rounds: int
    separate: bool
    command: str | None
    bursts: int = 1

    def __getitem__(self, name: str) -> Timing:
        return self.timings[name]

    def ratio(self, slow: str, fast: str) -> float:
        """`slow`'s median over `fast`'s: the speed-up of `fast`."""
        return self[slow].median_ms / self[fast].median_ms

    def paired(self, slow: str, fast: str) -> list[float]:
        """`fast`'s speed-up burst by burst: `slow`'s burst k over `fast`'s burst k, timed in
        the same turn of the same round, so that a drift of the machine between turns
        does not enter the ratio."""
        return [a / b for a, b in zip(self[slow].burst_medians_ms, self[fast].burst_medians_ms,
                                      strict=True)]

    def paired_saving_ms(self, slow: str, fast: str) -> float:
        """What `fast` saves on `slow` (ms), burst by burst as `paired`: the median of the
        differences of burst k of each, steadier than the difference of the medians (which
        may take each side from another burst)."""
        return statistics.median(a - b for a, b in zip(
            self[slow].burst_medians_ms, self[fast].burst_medians_ms, strict=True))

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "bursts": self.bursts, "separate": self.separate,
                "command": self.command,
                "timings": {k: t.as_dict() for k, t in self.timings.items()}}


class _Worker:
    """One worker process timing `workloads` (all of `runtime`), built and warmed up,
    waiting for bursts (`jaxprune.measure.worker`). Its stderr goes to a file, so that a
    chatty runtime cannot fill a pipe and stall it. A crash, a garbled answer, or no answer
    within `timeout` seconds (for the build and warm-up, then for each burst) is a
    `UserError` with the end of that file; the process is ended first."""

    def __init__(self, runtime: str, workloads: list[Workload], *, warmup: int, repeats: int,
                 threads: int, timeout: float):
        self.names = ", ".join(w.name for w in workloads)
        self.runtime, self.timeout = runtime, timeout
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        spec = {"runtime": runtime, "workloads": [w.as_dict() for w in workloads],
                "warmup": warmup, "repeats": repeats, "threads": threads}
        self.dir = tempfile.TemporaryDirectory(prefix="jaxprune-measure-")
        spec_path = Path(self.dir.name) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        self.stderr = open(Path(self.dir.name) / "stderr.txt", "w+", errors="replace")
        self.proc = subprocess.Popen([sys.executable, "-m", WORKER, str(spec_path)], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self.info = self._read()   # device, threads, imported: sent once warmed up

    def _fail(self, why: str):
        """End the process and raise the `UserError`: `why`, then the end of its stderr."""
        self.close()
        tail = " ".join(self._stderr.strip().splitlines()[-3:])[-600:]
        raise UserError(f"timing {self.names} ({self.runtime}) failed: "
                        f"{'; '.join(filter(None, [why, tail]))}")

    def _read(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.proc.kill()  # stuck: no point waiting for it to end on its own
            self._fail(f"no answer in {self.timeout:.0f} s")
        line = self.proc.stdout.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self._fail("" if not line else f"garbled answer {line[:80]!r}")

    def burst(self) -> list[dict]:
        """Time one burst; `[{"name", "times_ms"}]`, one per workload."""
        try:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        except OSError:  # it died while waiting (BrokenPipeError)
            self._fail("")
        return self._read()["results"]

    def close(self):
        """End the process (its stdin closed; killed if it hangs on), keep the end of its
        stderr, remove its files; twice is harmless."""
        if self.stderr.closed:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.seek(0)
        self._stderr = self.stderr.read()
        self.stderr.close()
        self.dir.cleanup()


def measure(workloads: list[Workload], *, rounds: int = 3, bursts: int = 1, warmup: int = 3,
            repeats: int = 10, threads: int | None = None, separate: bool = True,
            timeout: float = 1800, save: str | Path | None = None) -> Timings:
    """Time `workloads` in fresh processes (see the module doc); `save` writes the spec
    there so that `python -m jaxprune.measure SAVE` reruns it. `timeout`: seconds a worker
    may take to build and warm up, and then each burst."""
    if rounds < 1 or bursts < 1 or repeats < 1 or warmup < 0:
        raise UserError(f"measure: rounds, bursts and repeats must be >= 1 and warmup >= 0, "
                        f"got {rounds}, {bursts}, {repeats}, {warmup}")
    names = [w.name for w in workloads]
    if len(set(names)) != len(names):
        raise UserError(f"measure: workload names must be unique, got {names}")
    threads = threads or default_threads()
    if separate:  # a runtime's workloads next to each other: what is compared takes turns
        groups = [[w] for rt in RUNTIMES for w in workloads if w.runtime == rt]
    else:
        groups = [g for g in ([w for w in workloads if w.runtime == rt] for rt in RUNTIMES) if g]
    per_burst: dict[str, list[float]] = {n: [] for n in names}
    info: dict[str, dict] = {}
    for _ in range(rounds):
        workers = []
        try:
            for group in groups:  # one at a time: no build or warm-up beside another's
                workers.append(_Worker(group[0].runtime, group, warmup=warmup,
                                       repeats=repeats, threads=threads, timeout=timeout))
                info.update((w.name, workers[-1].info) for w in group)
            for b in range(bursts):
                # A B, then B A: a steady drift favours neither side of a ratio
                for worker in workers if b % 2 == 0 else workers[::-1]:
                    for r in worker.burst():
                        per_burst[r["name"]].append(statistics.median(r["times_ms"]))
        finally:
            for worker in workers:
                worker.close()
    timings = {}
    for w in workloads:
        medians = per_burst[w.name]
        out = info[w.name]
        timings[w.name] = Timing(w.name, w.runtime, statistics.median(medians),
                                 (min(medians), max(medians)), medians, repeats,
                                 out["threads"], out["device"], out["imported"])
    command = None
    if save is not None:
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps({"workloads": [w.as_dict() for w in workloads],
                                    "rounds": rounds, "bursts": bursts, "warmup": warmup,
                                    "repeats": repeats, "threads": threads,
                                    "separate": separate}, indent=1))
        command = f"python -m jaxprune.measure {save}"
    return Timings(timings, rounds, separate, command, bursts)


def call_overhead(runtime: str) -> Workload:
    """The workload that times `runtime`'s cost of one call that computes nothing: an
    identity program on a one-element input (torch: exported and loaded as a `model.pt2`,
    about 60 us a call on a 2-core CPU; JAX: jitted, a few us), named
    `call overhead <runtime>`. Timed alongside the pieces of a model (`separate=False`), it
    is what `in_model_ms` takes off each of them."""
    return Workload(f"call overhead {runtime}", runtime,
                    f"jaxprune.measure.workloads:{runtime}_call_overhead", {})


def in_model_ms(alone_ms: float, overhead_ms: float) -> float:
    """The time a piece of a model adds to the whole model, from its time called on its
    own (`alone_ms`) and its runtime's `call_overhead` (`overhead_ms`), both in ms per
    call: the whole model makes one call, so each piece's own call overhead is not paid
    there. Never below 0."""
    return max(alone_ms - overhead_ms, 0.0)


def load_spec(path: str | Path) -> tuple[list[Workload], dict]:
    """The workloads and settings a `measure(..., save=path)` call wrote."""
    spec = json.loads(Path(path).read_text())
    workloads = [Workload(**w) for w in spec.pop("workloads")]
    return workloads, spec
