"""The project's workload factories (see `jaxprune.measure`): each returns a zero-argument
step that runs one call to completion. Inputs are random (values do not change the time);
shapes are NHWC for JAX and NCHW for torch.

JAX:   `jax_model` (a jaxprune model: an export folder, or `arch.json` contents with random
       weights), `jax_layers` (one layer kind from its config, e.g. a merge candidate),
       `jax_train_step` (EASIER's data-parallel train step with its entropy statistics),
       `jax_call_overhead` (a jitted identity).
torch: `torch_program` (an exported `model.pt2`, what `converters.export` gives users),
       `torch_original` (torchvision's or timm's own model: the baseline users run),
       `torch_call_overhead` (an exported identity program).
"""
from __future__ import annotations


def _jax_forward(net, batch: int, input_size):
    import jax
    import numpy as np
    from flax import nnx
    net.eval()
    graphdef, state = nnx.split(net)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = jax.numpy.asarray(np.random.default_rng(0).normal(
        size=(batch, *input_size, net.spec.in_channels)).astype(np.float32))
    return lambda: fwd(state, x).block_until_ready()


def jax_model(batch: int, input_size, folder: str | None = None, arch: dict | None = None):
    """One jitted eval-mode forward pass of a jaxprune model: the model exported to `folder`
    (arch.json + model.safetensors), or described by `arch` (arch.json's contents) with
    fresh weights."""
    from converters.torch_arch import net_from_arch
    from converters.torch_in import from_torch
    net = from_torch(folder) if folder is not None else net_from_arch(arch)
    return _jax_forward(net, batch, input_size)


def jax_layers(batch: int, kind: str, config: dict, input_shapes: list):
    """One jitted eval-mode call of a single layer (its kind and `config()`, fresh weights)
    on inputs of `input_shapes` (each without the batch axis)."""
    import jax
    import numpy as np
    from flax import nnx

    from models.layers import Layer
    layer = Layer.kind(kind).from_config(config, nnx.Rngs(0))
    layer.eval()
    graphdef, state = nnx.split(layer)
    fwd = jax.jit(lambda s, *xs: nnx.merge(graphdef, s)(*xs))
    rng = np.random.default_rng(0)
    xs = [jax.numpy.asarray(rng.normal(size=(batch, *s)).astype(np.float32))
          for s in input_shapes]
    return lambda: fwd(state, *xs).block_until_ready()


def jax_call_overhead():
    """One call of a jitted identity on a one-element input: what every jitted call costs
    besides its computation (dispatch, argument handling, the wait for the result). See
    `jaxprune.measure.call_overhead`."""
    import jax
    x = jax.numpy.zeros((1, 1, 1, 1), jax.numpy.float32)
    identity = jax.jit(lambda v: v)
    return lambda: identity(x).block_until_ready()


def jax_train_step(arch: str, options: dict, num_classes: int, batch: int, input_size,
                   entropy: bool = True):
    """One optimizer step of `Trainer` (SGD, momentum 0.9, weight decay 1e-4, float32) on a
    global batch sharded over every device, with EASIER's per-site entropy statistics when
    `entropy` is on (what an EASIER round runs)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import models
    from jaxprune.config import TrainConfig
    from jaxprune.methods.easier.method import EntropyHooks
    from jaxprune.train import Trainer, make_mesh
    mesh = make_mesh()
    m = models.create(arch, num_classes=num_classes, seed=0, **options)
    trainer = Trainer(m, TrainConfig(), steps_per_epoch=1000, mesh=mesh,
                      hooks=EntropyHooks() if entropy else None)
    trainer.start_round()
    rng = np.random.default_rng(0)
    data = {"image": rng.normal(size=(batch, *input_size, 3)).astype(np.float32),
            "label": rng.integers(0, num_classes, batch).astype(np.int32),
            "mask": np.ones(batch, np.float32)}
    data = jax.device_put(data, NamedSharding(mesh, P("data")))

    def step():
        trainer.train_step(data)
        jax.block_until_ready(trainer.params)
    return step


def _torch_forward(module, batch: int, input_size, in_channels: int = 3):
    import torch
    x = torch.randn(batch, in_channels, *input_size, generator=torch.Generator().manual_seed(0))

    def step():
        with torch.no_grad():
            module(x)
    return step


def torch_program(folder: str, batch: int, input_size, in_channels: int = 3):
    """One eager call of the `torch.export` program `folder/model.pt2` (jaxprune-free), on
    `in_channels` input channels (not 3 for a piece of a network, e.g. a merged segment)."""
    import torch
    module = torch.export.load(f"{folder}/model.pt2").module()
    return _torch_forward(module, batch, input_size, in_channels)


def torch_call_overhead():
    """One eager call of an exported identity program on a one-element input, saved and
    loaded as a `model.pt2` is: what every call of an exported program costs besides its
    computation (the input guards, flattening the arguments, whatever the input's size).
    See `jaxprune.measure.call_overhead`."""
    import io

    import torch

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x
    x = torch.zeros(1, 1, 1, 1)
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(Identity(), (x,)), buffer)
    buffer.seek(0)
    return _torch_forward(torch.export.load(buffer).module(), 1, (1, 1), 1)


def torch_original(arch: str, batch: int, input_size, options: dict | None = None,
                   num_classes: int | None = None):
    """One eager `no_grad` call of the torch original of `arch` (torchvision's or timm's own
    module, `converters.torch_reference`), eval mode, fresh weights."""
    from converters.torch_reference import build
    return _torch_forward(build(arch, num_classes=num_classes, **(options or {})), batch,
                          input_size)
