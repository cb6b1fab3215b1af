"""The cpu backend's routed backward of max pooling (docs/routed_backward.md; cpu_backend/routed.py): each
routed op against the float64 dense reference on the scattered gradient (all 4 activations, LeNet's C1 and C3,
batch 1, odd batches with a partial chunk of 16, odd map sizes), head_train with yconv=None, the same bits on
1 and 2 threads, and packed FMAs at the machine's widest vector width.
"""

from __future__ import annotations

import numpy as np
import pytest

from lenet_gpu import reference as R
from lenet_gpu.backends.cpu_backend import CpuBackend

from .host_checks import activated
from .parity import TOL, assert_close, nan_like, rand

BE = CpuBackend()
ACTS = R.ACTIVATIONS

# (N, C, H, W, K, R, S): the conv's input and filters. LeNet's C1 and C3 at batch 1 and 19 (a partial chunk),
# odd maps (odd conv outputs: the last row/column is never routed), and filters that are not 5×5
ROUTED_SHAPES = [
    (1, 1, 32, 32, 6, 5, 5),
    (19, 1, 32, 32, 6, 5, 5),
    (1, 6, 14, 14, 16, 5, 5),
    (19, 6, 14, 14, 16, 5, 5),
    (3, 3, 12, 11, 5, 3, 4),
    (2, 7, 9, 10, 3, 2, 2),
]


def routed_case(shape, act, seed=11):
    """x, w, gz (pooled size), argmax of the pool over an activated conv output, the scattered dense dz."""
    n, c, h, w, k, r, s = shape
    ho, wo = h - r + 1, w - s + 1
    x = activated((n, c, h, w), act, seed)
    wt = rand((k, c, r, s), seed + 1, 0.3)
    yconv = activated((n, k, ho, wo), act, seed + 2)
    _, am = R.pool2x2_fwd(yconv.astype(np.float64), "max")
    gz = rand((n, k, ho // 2, wo // 2), seed + 3)
    dz = R.pool2x2_bwd(gz.astype(np.float64), am, "max", (ho, wo))
    return x, wt, gz, am, dz


@pytest.mark.parametrize("shape", ROUTED_SHAPES)
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_conv2d_bwd_weight_routed(shape, variant):
    x, wt, gz, am, dz = routed_case(shape, "relu")
    dw, db = nan_like(wt.shape), nan_like((wt.shape[0],))
    BE.conv2d_bwd_weight_routed(x, gz, am, dw, db, variant=variant)
    ref_dw, ref_db = R.conv2d_bwd(x.astype(np.float64), wt.astype(np.float64), dz, dz)[1:]
    assert_close(dw, ref_dw, *TOL["conv2d_bwd_weight"], what=f"routed dw {shape} {variant}")
    assert_close(db, ref_db, *TOL["conv2d_bwd_weight"], what=f"routed db {shape} {variant}")
    dw2, db2 = nan_like(wt.shape), nan_like((wt.shape[0],))
    BE.conv2d_bwd_weight(x, dz.astype(np.float32), dw2, db2)  # the dense kernel on the scattered gradient
    assert_close(dw, dw2, *TOL["conv2d_bwd_weight"], what=f"routed vs dense dw {shape}")


@pytest.mark.parametrize("shape", ROUTED_SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_conv2d_bwd_data_routed(shape, act):
    x, wt, gz, am, dz = routed_case(shape, act)
    out = nan_like(x.shape)
    BE.conv2d_bwd_data_routed(gz, wt, am, x, out, act)
    dx = R.conv2d_bwd(x.astype(np.float64), wt.astype(np.float64), dz, dz)[0]
    ref = dx * R.activation_grad(x.astype(np.float64), act)
    assert_close(out, ref, *TOL["conv2d_bwd_data"], what=f"routed data {shape} {act}")
