"""The CPU-friendly forms of two layers compute exactly what they replace:
`conv_as_matmul` (convolutions on maps smaller than the kernel) and the
window-view MaxPool (torch's first-maximum gradient)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from models.layers import Conv, MaxPool, conv_as_matmul
from models.layers.conv import small_map


@pytest.mark.parametrize("hw,cin,cout,k,stride,pad,groups,dilation", [
    ((2, 3), 8, 16, 3, 1, 1, 1, 1),   # 2x2 map, 3x3 kernel: ResNet stage 4 at 32 px
    ((1, 2), 8, 8, 3, 1, 1, 1, 1),
    ((3, 3), 6, 6, 5, 2, 2, 1, 1),
    ((2, 3), 8, 8, 3, 1, 1, 8, 1),    # depthwise
    ((4, 5), 8, 12, 5, 1, 2, 4, 1),   # grouped
    ((7, 6), 4, 4, 3, 2, 1, 1, 1),
    ((3, 4), 4, 6, 3, 1, 2, 2, 2),    # dilated: taps 2 apart
])
def test_conv_as_matmul_is_lax_conv(hw, cin, cout, k, stride, pad, groups, dilation):
    x = jax.random.normal(jax.random.key(0), (3, *hw, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout))
    args = ((stride, stride), ((pad, pad), (pad, pad)))
    ref = jax.lax.conv_general_dilated(x, w, *args, rhs_dilation=(dilation, dilation),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=groups)
    np.testing.assert_allclose(conv_as_matmul(x, w, *args, groups, (dilation, dilation)), ref,
                               atol=1e-5)


def test_conv_picks_the_matmul_form_only_for_small_maps():
    pad = ((1, 1), (1, 1))
    assert small_map((2, 2), (3, 3), (1, 1), pad)
    assert not small_map((8, 8), (3, 3), (1, 1), pad)
    assert small_map((4, 4), (3, 3), (2, 2), pad)  # 2x2 output: its gradient is small
    conv = Conv(4, 4, 3, padding=1, rngs=nnx.Rngs(0))  # both forms give the same result
    x = jax.random.normal(jax.random.key(1), (1, 2, 2, 4))
    ref = jax.lax.conv_general_dilated(x, conv.kernel.value, (1, 1), pad,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv(x), ref, atol=1e-5)


@pytest.mark.parametrize("k,stride,pad,hw", [(3, 2, 1, 9), (2, 2, 0, 8), (3, 1, 1, 5)])
def test_maxpool_matches_torch_with_ties(k, stride, pad, hw):
    """Forward and gradient equal torch's max_pool2d, ties included (inputs on a
    coarse grid, so windows hold equal maxima)."""
    x = jnp.round(jax.random.normal(jax.random.key(0), (2, hw, hw, 3)) * 2) / 2
    pool = MaxPool(k, stride, pad)
    y = pool(x)
    weights = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size
    grad = jax.grad(lambda x: jnp.sum(pool(x) * weights))(x)
    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, k, stride, pad)
    (yt * torch.from_numpy(np.array(weights).transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(grad), xt.grad.numpy().transpose(0, 2, 3, 1))
