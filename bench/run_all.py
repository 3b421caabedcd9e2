"""Every benchmark of the project in one command; writes BENCHMARKS.md.

    python bench/run_all.py            # full settings (tens of minutes on a 2-core CPU)
    python bench/run_all.py --quick    # fewer steps and cases, same tables (about 20 minutes)
    python bench/run_all.py --out /tmp/B.md

Every time in it is measured by `jaxprune.measure`: each side of a comparison alone in a
fresh process of its own (torch never in a process that imported JAX), warm-up first, the
sides alternating (round by round, or burst by burst within a round), the median of the
round or burst medians with their spread.

* train step: EASIER's jitted train step (statistics on) against the official EASIER
  PyTorch step (`bench/train_step.py`, `bench/easier_reference.py`); target >= 1.25x on
  a CPU, >= 2x on a GPU. On a GPU also the fraction of peak FLOP/s (XLA's FLOP count of
  the compiled step over the measured step time).
* fused vs dense latency: `bench/merge_speed.py` (MobileNetV2-1.4 with DepthShrinker's
  patterns, Swin-T without MLP GELUs, EASIER's ResNet-18 without mid-block ReLUs), JAX and
  torch; the torch baseline is torchvision's or timm's own model.
* layermerge, planned against measured: `bench/layermerge_speed.py` (torchvision's
  ResNet-18 at budget 1.5x, and without --quick MobileNetV2-1.0 at 1.6x, in LayerMerge's
  space, then ResNet-18 again with --strided-blocks, beyond the papers; the latency table
  timed in torch at one thread; tables are kept in runs/bench/layermerge_tables and
  reused), with their speed targets in torch.
* data pipeline: images/s of each input pipeline against the train step it feeds
  (`bench/data_pipeline.py`); above 1 the pipeline is not the bottleneck.
* compile time: the first call of the jitted train step per model (resnet18_cifar,
  vgg16_bn, mobilenet_v2_cifar, swin_t at 32 px); target < 30 s on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from run import _one_xla_device_per_core  # noqa: E402  (the CLI's device setup, before jax)

TRAIN_STEP_TARGET = {"cpu": 1.25, "gpu": 2.0}
COMPILE_TARGET_S = 30.0
COMPILE_MODELS = ("resnet18_cifar", "vgg16_bn", "mobilenet_v2_cifar", "swin_t")
# Dense peak FLOP/s per device kind for float32 matmuls as XLA runs them on GPU (TF32
# tensor cores); a device not listed gets no fraction.
PEAK_FLOPS = {"H100": 494e12, "H200": 494e12, "A100": 156e12, "L4": 60e12, "V100": 15.7e12}


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _run(args: list[str], timeout: float) -> list[dict]:
    """A benchmark script or worker in its own process; its JSON result lines."""
    t0 = time.perf_counter()
    print(f"$ {' '.join(args)}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return _json_lines(proc.stdout)


# -- workers (run in their own process through --worker) ----------------------------------

def _train_step_parts(name: str, batch: int, size: int, width: int | None):
    """(trainer, a global batch) for `name` at `size` px, data parallel over every device."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import models
    from jaxprune.config import TrainConfig
    from jaxprune.methods.easier.method import EntropyHooks
    from jaxprune.train import Trainer, make_mesh
    mesh = make_mesh()
    options = {"width": width} if width else {}
    m = models.create(name, num_classes=10, seed=0, **options)
    trainer = Trainer(m, TrainConfig(), steps_per_epoch=1000, mesh=mesh, hooks=EntropyHooks())
    trainer.start_round()
    rng = np.random.default_rng(0)
    data = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32),
            "mask": np.ones(batch, np.float32)}
    return trainer, jax.device_put(data, NamedSharding(mesh, P("data")))


def worker_compile(name: str, batch: int) -> dict:
    """Seconds of the first call of the jitted train step (trace + compile + one run)."""
    import jax
    trainer, data = _train_step_parts(name, batch, 32, None)
    t0 = time.perf_counter()
    trainer.train_step(data)
    jax.block_until_ready(trainer.params)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train_step(data)
    jax.block_until_ready(trainer.params)
    return {"model": name, "image_size": 32, "batch": batch, "first_call_s": first,
            "compile_s": first - (time.perf_counter() - t0), "devices": jax.device_count()}


def worker_flops(batch: int, width: int) -> dict:
    """XLA's FLOP count of one compiled EASIER train step of resnet18_cifar (no timing: the
    step time comes from bench/train_step.py)."""
    import jax
    from jaxprune.train.mesh import replicate
    trainer, data = _train_step_parts("resnet18_cifar", batch, 32, width)
    args = (trainer.params, trainer.extra, trainer.rest, trainer.opt_state,
            replicate(trainer._zero_train, trainer.mesh), trainer.step, trainer.aux, data)
    cost = trainer._train.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    kind = jax.devices()[0].device_kind
    return {"device_kind": kind, "platform": jax.default_backend(), "batch": batch,
            "width": width, "flops_per_step": float(cost.get("flops", 0.0)) if cost else 0.0,
            "peak_flop_s": next((v for k, v in PEAK_FLOPS.items() if k in kind), None)}


WORKERS = {"compile": worker_compile, "flops": worker_flops}


# -- the report ----------------------------------------------------------------------------

def machine() -> dict:
    import importlib.metadata as md

    import jax
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "grain", "torch", "torchvision", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    devices = jax.devices()
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": jax.default_backend(),
            "device_kind": devices[0].device_kind, "devices": len(devices),
            "python": platform.python_version(), "os": platform.platform(), "versions": versions}


def _f(v, digits=1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _section(title: str, intro: str, header: list[str], rows: list[list]) -> list[str]:
    """Markdown lines of a `## title` section: the intro, then a table when there are rows."""
    from jaxprune.report import table
    return [f"## {title}", "", intro, ""] + (table(header, rows) if rows else []) + [""]


def _with_spread(row: dict, side: str) -> str:
    """`side`'s median ms of a bench row and its spread (min – max of the round or burst
    medians)."""
    low, high = row[f"{side}_spread_ms"]
    return f"{row[f'{side}_ms']:.2f} ({low:.2f} – {high:.2f})"


def _by_burst(ratios: list[float]) -> str:
    import statistics
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f} – {max(ratios):.2f})"


def _lm_target(row: dict) -> str:
    """The speed target of a layermerge_speed row (torch rows only), and whether its
    median meets it."""
    if not row["speed_target"]:
        return ""
    met = row["measured_speedup"] >= row["speed_target"]
    return f">= {row['speed_target']}x: {'met' if met else 'missed'}"


def markdown(mach: dict, results: dict, command: str, seconds: float) -> str:
    gpu = mach["platform"] == "gpu"
    lines = ["# Benchmarks", "",
             f"Written by `{command}` in {seconds / 60:.1f} min "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Rerun it to refresh.", "",
             "## Machine", "",
             f"* CPU: {mach['cpu']}, {mach['cores']} cores",
             f"* JAX platform: {mach['platform']}, {mach['devices']} x {mach['device_kind']}",
             f"* Python {mach['python']} on {mach['os']}",
             "* " + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()), ""]
    if not gpu:
        lines += ["No GPU on this machine: the GPU table below is empty; run the same command "
                  "on a GPU node to fill it.", ""]

    ts = results.get("train_step")
    target = TRAIN_STEP_TARGET["gpu" if gpu else "cpu"]
    rows = []
    if ts:
        for name, side in ts["sides"].items():
            rows.append([name, f"{side['s_per_step']:.3f}",
                         ", ".join(f"{v:.3f}" for v in side["round_medians_s"]),
                         _f(ts["batch"] / side["s_per_step"]), side["threads"], side["device"]])
        ok = "meets" if ts["ratio"] >= target else "misses"
        summary = (f" **Ratio official / jaxprune: {ts['ratio']:.2f}x** (target >= {target}x: "
                   f"{ok}); the statistics cost {100 * ts['stats_overhead']:.1f} % of the step. "
                   f"resnet18_cifar width {ts['width']}, batch {ts['batch']}, float32, "
                   f"{ts['rounds']} rounds of {ts['steps']} steps. Command: `{ts['command']}`.")
    lines += _section(
        "EASIER train step vs the official EASIER step",
        "jaxprune: the jitted data-parallel step with per-site ON/OFF statistics on device. "
        "Baseline: the official EASIER step in PyTorch eager, as its published code runs it "
        "(its ResNet-18, a hook on every ReLU, per-layer entropy read to the host each step), "
        "alone in its own process." + (summary if ts else ""),
        ["side", "s/step (median)", "round medians", "img/s", "threads / devices", "device"],
        rows)

    fl = results.get("flops")
    rows = [["(no GPU in this run)", "", "", "", "", ""]]
    if gpu and fl and ts:
        step_s = ts["sides"]["jaxprune"]["s_per_step"]
        flop_s, peak = fl["flops_per_step"] / step_s, fl["peak_flop_s"]
        rows = [[fl["device_kind"], fl["batch"], _f(flop_s / 1e12, 2),
                 _f(peak / 1e12 if peak else None, 0), _f(flop_s / peak if peak else None, 3),
                 f"{ts['ratio']:.2f}x"]]
    lines += _section(
        "GPU: fraction of peak",
        "Achieved FLOP/s = XLA's FLOP count of the compiled EASIER step / the step time "
        "measured above; peak: dense TF32 FLOP/s of the device kind.",
        ["device", "batch", "TFLOP/s", "peak TFLOP/s", "fraction of peak",
         "ratio vs official (target >= 2x)"], rows)

    lines += _section(
        "Fused vs dense latency",
        "Dense network against the same network with sites linearized and fused by "
        "`jaxprune.merge`; random weights. torch: the dense side is torchvision's or timm's "
        "own module, the fused side jaxprune's exported model.pt2; JAX: both jitted. Median "
        "of 3 rounds of 3 alternating bursts (spread: min – max of the burst medians), each "
        "model and runtime in its own process. `bench/merge_speed.py` (its docstring "
        "describes the "
        "cases).",
        ["case", "batch", "runtime", "dense ms (spread)", "fused ms (spread)", "speed-up"],
        [[r["case"], r["batch"], r["runtime"],
          _with_spread(r, "dense"),
          _with_spread(r, "fused"),
          f"**{r['speedup']:.2f}x**"] for r in results.get("merge_speed") or []])
    lm = results.get("layermerge") or []
    how = (f"{lm[0]['threads']} thread(s), batch {lm[0]['batch']}, {lm[0]['rounds']} rounds "
           f"of {lm[0]['bursts']} alternating bursts of {lm[0]['repeats']} calls" if lm else "")
    lines += _section(
        "LayerMerge: planned against measured",
        "torchvision's model at 224 px, random weights and BatchNorm statistics, searched in "
        "LayerMerge's space (`bn_entropy` importance) under `target_speedup` of the whole "
        "model as a latency table timed in torch predicts it (each segment option's merged "
        "layer exported, its `model.pt2` called eagerly, less the per-call overhead, and the "
        "whole model, BatchNorms folded, timed with them), merged and exported. "
        "\"predicted\": that prediction; "
        "measured: whole models, torch = torchvision's own dense module against the fused "
        "`model.pt2`, JAX = both jitted, each in a fresh process "
        f"({how}); \"burst by burst\": the median and min – max of dense over fused burst "
        "by burst, the two timed in the same turn. `bench/layermerge_speed.py` (its "
        "docstring describes the steps).",
        ["case", "runtime", "budget", "convs dropped", "ReLUs linearized", "predicted",
         "dense ms (spread)", "fused ms (spread)", "measured", "burst by burst", "target"],
        [[r["case"] + (", strided blocks" if r.get("strided_blocks") else ""), r["runtime"],
          f"{r['target_speedup']}x"
          + ("" if r["target_in_reach"] else " (out of reach: fastest plan)"),
          r["dropped"], r["linearized"], f"{r['predicted_speedup']:.2f}x",
          _with_spread(r, "dense"),
          _with_spread(r, "fused"),
          f"**{r['measured_speedup']:.2f}x**", _by_burst(r["burst_speedups"]),
          _lm_target(r)] for r in lm])
    lines += _section(
        "Data pipeline vs the train step",
        "Images/s of each input pipeline alone (one epoch, default workers) against the "
        "ResNet-18 train step at the same size; ratio > 1: the pipeline keeps up. "
        "`bench/data_pipeline.py`.",
        ["case", "px", "workers", "pipeline img/s", "train step img/s", "ratio"],
        [[r["case"], r["image_size"], r["num_workers"], _f(r["pipeline_images_per_s"]),
          _f(r["train_step_images_per_s"]), f"**{r['pipeline_over_step']:.1f}x**"]
         for r in results.get("data_pipeline") or []])
    lines += _section(
        "Compile time of the train step",
        f"First call of the jitted EASIER train step (trace, compile, one step) minus one "
        f"later step, 32 px; target < {COMPILE_TARGET_S:.0f} s on a CPU.",
        ["model", "batch", "compile s", "first call s", "target"],
        [[r["model"], r["batch"], f"**{r['compile_s']:.1f}**", f"{r['first_call_s']:.1f}",
          "ok" if r["compile_s"] < COMPILE_TARGET_S else "over"]
         for r in results.get("compile") or []])
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and cases (same settings)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _one_xla_device_per_core()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](**json.loads(args.args))))
        return 0
    t0 = time.perf_counter()
    me = str(Path(__file__).relative_to(ROOT))

    def worker(kind: str, **kw) -> dict:
        return _run([me, "--worker", kind, "--args", json.dumps(kw)], timeout=1800)[-1]

    q = args.quick
    results: dict = {}
    # --quick keeps the benchmark's setting (width 64, batch 128) with fewer steps per round
    ts = ["bench/train_step.py"] + (["--steps", "3"] if q else [])
    results["train_step"] = _run(ts, timeout=3600)[-1]
    if machine()["platform"] == "gpu":
        results["flops"] = worker("flops", batch=64 if q else 128, width=16 if q else 64)
    # --quick: DepthShrinker's six patterns in torch at batch 32 (the published comparison's
    # batch), EASIER's ResNet-18 in both runtimes at batch 1
    ms = ["bench/merge_speed.py"]
    if q:
        patterns = ",".join(f"mbv2_{k}" for k in "ABCDEF")
        results["merge_speed"] = [r for r in _run(
            ms + ["--cases", patterns, "--batches", "32", "--runtimes", "torch", "--repeats", "5"],
            timeout=7200) if "speedup" in r]
        results["merge_speed"] += [r for r in _run(
            ms + ["--cases", "resnet18_cifar_mid", "--batches", "1", "--repeats", "10"],
            timeout=7200) if "speedup" in r]
    else:
        results["merge_speed"] = [r for r in _run(ms, timeout=7200) if "speedup" in r]
    lm = ["bench/layermerge_speed.py", "--runtime", "torch", "--threads", "1", "--drop-layers"]
    results["layermerge"] = [
        r for args in (["--cases", "resnet18" if q else "resnet18,mbv2_100"],
                       # beyond the papers: downsampling blocks merge whole
                       ["--cases", "resnet18", "--strided-blocks"])
        for r in _run(lm + args, timeout=7200) if "measured_speedup" in r]
    results["data_pipeline"] = [r for r in _run(
        ["bench/data_pipeline.py", "--rounds", "1" if q else "3"], timeout=3600) if "case" in r]
    results["compile"] = [worker("compile", name=name, batch=8 if q else 32)
                          for name in COMPILE_MODELS]
    command = "python bench/run_all.py" + (" --quick" if q else "")
    text = markdown(machine(), results, command, time.perf_counter() - t0)
    args.out.write_text(text)
    print(json.dumps(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
