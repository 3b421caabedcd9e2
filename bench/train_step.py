"""Images/s of the EASIER train step against the reference PyTorch step.

    python bench/train_step.py                 # resnet18_cifar, batch 128, one device per core
    python bench/train_step.py --steps 3 --blocks 2 --width 16    # quicker, narrower

Three steps, each in its own process on the same machine, timed back to back
in interleaved blocks (so a change in machine load hits all of them alike);
each reports the median of its blocks:

* `jax`: jaxprune's jitted data-parallel train step with per-site ON/OFF
  statistics accumulated on device (what an EASIER round runs);
* `jax_nostats`: the same step with the statistics off;
* `torch_ref`: what the reference EASIER code does per step in PyTorch eager:
  a forward hook on every ReLU keeps its input, and after the forward pass the
  entropy of every layer is computed and read to the host (`.item()`), then
  loss, backward and an SGD step.

The last line is one JSON object: `jax_img_s`, `jax_nostats_img_s`,
`torch_ref_img_s`, `ratio` (= jax / torch_ref), `stats_overhead` (= 1 -
jax / jax_nostats) and the setup.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run import _one_xla_device_per_core  # noqa: E402  (the CLI's device setup, before jax)


def jax_step(width: int, batch: int, stats: bool):
    """A closure running `n` train steps of a fresh model and waiting for them."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import models
    from jaxprune.config import TrainConfig
    from jaxprune.methods.easier.method import EntropyHooks
    from jaxprune.train import Trainer, make_mesh
    mesh = make_mesh()
    m = models.create("resnet18_cifar", num_classes=10, width=width, seed=0)
    trainer = Trainer(m, TrainConfig(), steps_per_epoch=1000, mesh=mesh,
                      hooks=EntropyHooks() if stats else None)
    trainer.start_round()
    rng = np.random.default_rng(0)
    sharding = NamedSharding(mesh, P("data"))
    data = {"image": rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32),
            "mask": np.ones(batch, np.float32)}
    data = {k: jax.device_put(v, sharding) for k, v in data.items()}

    def run(n: int) -> None:
        for _ in range(n):
            trainer.train_step(data)
        trainer.finish_epoch()  # the per-epoch fetch: waits for the steps
    return run


def torch_ref_step(width: int, batch: int):
    """The reference's step: hooks on every ReLU, per-batch entropy of every layer."""
    import torch

    from converters import torch_reference
    model = torch_reference.build("resnet18_cifar", num_classes=10, width=width, seed=0)
    model.train()
    for module in model.modules():  # the reference swaps in non-inplace ReLUs for its hooks
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    saved: list[torch.Tensor] = []
    relus = [mod for mod in model.modules() if isinstance(mod, torch.nn.ReLU)]
    for mod in relus:
        mod.register_forward_hook(lambda mod, inputs, output: saved.append(inputs[0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def layer_entropy(z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        plus = torch.sum(z >= 0, dim=0) / n
        minus = torch.sum(z < 0, dim=0) / n
        while plus.dim() > 1:  # NCHW: average the positions of each channel
            plus, minus = plus.mean(dim=1), minus.mean(dim=1)
        return (-plus * torch.log2(torch.clamp(plus, min=1e-10))
                - minus * torch.log2(torch.clamp(minus, min=1e-10)))

    running: dict[str, float] = {}  # host-side sums, read every step as the reference does

    def run(n: int) -> None:
        for _ in range(n):
            out = model(x)
            per_layer = torch.stack([layer_entropy(z).mean() for z in saved])
            saved.clear()
            loss = loss_fn(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running["loss"] = running.get("loss", 0.0) + loss.item()
            for k, h in enumerate(per_layer):
                running[k] = running.get(k, 0.0) + h.item()
            running["correct"] = running.get("correct", 0.0) + out.argmax(1).eq(y).sum().item()
    return run


KINDS = ("jax", "jax_nostats", "torch_ref")


def worker(kind: str, width: int, batch: int) -> None:
    """One step kind in its own process: warm up, say so, then time `n` steps per
    line read from stdin. Separate processes keep XLA's and torch's thread pools
    (which spin a while after each op) from slowing each other down."""
    import jax
    import torch
    run = (torch_ref_step(width, batch) if kind == "torch_ref"
           else jax_step(width, batch, stats=kind == "jax"))
    run(1)  # compile and warm up
    print(json.dumps({"devices": jax.device_count(), "platform": jax.default_backend(),
                      "torch_threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        run(int(line))
        print(time.perf_counter() - t0, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = the paper's)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks per step kind")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _one_xla_device_per_core()
    if args.worker:
        worker(args.worker, args.width, args.batch)
        return 0
    workers, setup = {}, {}
    for kind in KINDS:  # started one after the other: compilation does not overlap timing
        workers[kind] = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, "--width", str(args.width),
             "--batch", str(args.batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        setup[kind] = json.loads(workers[kind].stdout.readline())
    seconds: dict[str, list[float]] = {k: [] for k in KINDS}
    for block in range(args.blocks):
        for kind, proc in workers.items():
            time.sleep(1.0)  # let the previous worker's threads go idle
            proc.stdin.write(f"{args.steps}\n")
            proc.stdin.flush()
            seconds[kind].append(float(proc.stdout.readline()) / args.steps)
            print(f"block {block + 1}/{args.blocks} {kind:12s} {seconds[kind][-1]:.3f} s/step",
                  file=sys.stderr, flush=True)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    img_s = {k: args.batch / statistics.median(v) for k, v in seconds.items()}
    result = {
        "bench": "train_step", "model": "resnet18_cifar", "width": args.width,
        "batch": args.batch, "devices": setup["jax"]["devices"],
        "platform": setup["jax"]["platform"], "torch_threads": setup["torch_ref"]["torch_threads"],
        "steps": args.steps, "blocks": args.blocks,
        "jax_img_s": img_s["jax"], "jax_nostats_img_s": img_s["jax_nostats"],
        "torch_ref_img_s": img_s["torch_ref"],
        "ratio": img_s["jax"] / img_s["torch_ref"],
        "stats_overhead": 1.0 - img_s["jax"] / img_s["jax_nostats"],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
