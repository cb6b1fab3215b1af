"""LeNet-5's training step and inference pass as a plain sequence of backend ops over preallocated buffers.

For launch accounting and host-overhead timing without the model: the compile report and the fill
table (scripts/kernel_report.py) record the launches of one step, ``bench/host.py`` times the host's
work per step over a Runtime that does nothing, and the tests run whole steps against the numpy
backend. It drives any Backend of the protocol (the step state, schedule and stats of
lenet_gpu.stepstate included), in the order the model trains:

    batch_prepare → C1 (+S2) → C3 (+S4) → C5 → F6 → output → softmax_xent → output' → F6' → C5' →
    S4'·act' → C3 dw → C3 dx (→ S2'·act') → C1 dw → optimizer → step_advance

using the fused ops ``conv2d_pool_fwd`` and ``conv2d_bwd_data_pool`` where the backend lists them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...spec import IMAGE_HW, INPUT_HW, NUM_CLASSES, NetConfig, init_params, param_layout, views
from ...stepstate import HostState, schedule_table


class LeNetProgram:
    """Buffers of one batch size and the ops of a training step / inference pass over them.

    ``step()`` launches one training step (the state moves on); ``forward()`` launches the inference
    pass of the current batch. ``n`` images (random, seeded) are resident; ``steps_per_epoch`` = n //
    batch; the schedule table covers ``sched_rows`` steps.
    """

    def __init__(
        self, be: Any, batch: int, cfg: NetConfig | None = None, optimizer: str = "adam", n: int | None = None,
        seed: int = 0, shift: int = 2, lr: float = 1e-3, sched_rows: int = 64, fused: bool = True,
        mean: float = 0.1307, std: float = 0.3081,
    ) -> None:
        self.be, self.batch, self.cfg = be, int(batch), cfg or NetConfig()
        self.optimizer, self.mean, self.std = optimizer, float(mean), float(std)
        self.fused_fwd = fused and "conv2d_pool_fwd" in be.variants
        self.fused_bwd = fused and "conv2d_bwd_data_pool" in be.variants
        n = int(n or 2 * batch)
        rng = np.random.default_rng(seed)
        e, f6, b = be.empty, self.cfg.f6, self.batch
        self.images = be.to_device(rng.integers(0, 256, size=(n, IMAGE_HW, IMAGE_HW)).astype(np.uint8))
        self.labels = be.to_device(rng.integers(0, NUM_CLASSES, size=n).astype(np.uint8))
        self.perm = be.to_device(rng.permutation(n).astype(np.int32))
        _, size = param_layout(self.cfg)
        self.params = be.to_device(init_params(self.cfg, seed))
        self.grads, self.m = be.zeros((size,)), be.zeros((size,))
        self.v = be.zeros((size,)) if optimizer == "adam" else None
        self.p, self.g = views(self.params, self.cfg), views(self.grads, self.cfg)
        self.beta1, self.beta2, self.eps, self.wd, self.momentum = 0.9, 0.999, 1e-8, 0.0, 0.9
        lrs = np.full(sched_rows, lr) * np.linspace(1.0, 0.5, sched_rows)
        self.sched = be.to_device(schedule_table(lrs, 0, self.beta1, self.beta2))
        self.steps_per_epoch = max(1, n // b)
        self.state = be.to_device(HostState(steps_per_epoch=self.steps_per_epoch, seed=seed, shift=shift).to_array())
        self.stats = be.zeros((self.steps_per_epoch, 2))
        self.x, self.y = e((b, 1, INPUT_HW, INPUT_HW)), e((b,), np.int32)
        self.a1, self.p1, self.m1 = e((b, 6, 28, 28)), e((b, 6, 14, 14)), e((b, 6, 14, 14), np.uint8)
        self.a3, self.p3, self.m3 = e((b, 16, 10, 10)), e((b, 16, 5, 5)), e((b, 16, 5, 5), np.uint8)
        self.a5, self.a6, self.logits = e((b, 120)), e((b, f6)), e((b, NUM_CLASSES))
        self.dlogits, self.da6, self.da5 = e((b, NUM_CLASSES)), e((b, f6)), e((b, 120))
        self.dp3, self.dz3 = e((b, 16, 5, 5)), e((b, 16, 10, 10))
        self.dp1, self.dz1 = e((b, 6, 14, 14)), e((b, 6, 28, 28))
        self.p3_flat, self.dp3_flat = self.p3.reshape(b, 400), self.dp3.reshape(b, 400)

    def forward(self) -> None:
        """The inference pass of the current batch: batch_prepare, then C1 … output (logits)."""
        be, p, act, pool = self.be, self.p, self.cfg.activation, self.cfg.pool
        be.batch_prepare(self.images, self.labels, self.perm, self.state, self.x, self.y, self.mean, self.std)
        if self.fused_fwd:
            be.conv2d_pool_fwd(self.x, p["c1.w"], p["c1.b"], self.a1, self.p1, self.m1, act, pool)
            be.conv2d_pool_fwd(self.p1, p["c3.w"], p["c3.b"], self.a3, self.p3, self.m3, act, pool)
        else:
            be.conv2d_fwd(self.x, p["c1.w"], p["c1.b"], self.a1, act)
            be.pool2x2_fwd(self.a1, self.p1, self.m1, pool)
            be.conv2d_fwd(self.p1, p["c3.w"], p["c3.b"], self.a3, act)
            be.pool2x2_fwd(self.a3, self.p3, self.m3, pool)
        be.dense_fwd(self.p3_flat, p["c5.w"], p["c5.b"], self.a5, act)
        be.dense_fwd(self.a5, p["f6.w"], p["f6.b"], self.a6, act)
        be.dense_fwd(self.a6, p["out.w"], p["out.b"], self.logits, "identity")

    def backward(self) -> None:
        """Loss, statistics and every gradient of the current batch."""
        be, p, g, act, pool = self.be, self.p, self.g, self.cfg.activation, self.cfg.pool
        be.softmax_xent(self.logits, self.y, self.dlogits, self.stats, self.state)
        be.dense_bwd(self.a6, p["out.w"], self.logits, self.dlogits, self.da6, g["out.w"], g["out.b"], "identity")
        be.dense_bwd(self.a5, p["f6.w"], self.a6, self.da6, self.da5, g["f6.w"], g["f6.b"], act)
        be.dense_bwd(self.p3_flat, p["c5.w"], self.a5, self.da5, self.dp3_flat, g["c5.w"], g["c5.b"], act)
        be.pool2x2_bwd(self.dp3, self.m3, self.a3, self.dz3, pool, act)
        be.conv2d_bwd_weight(self.p1, self.dz3, g["c3.w"], g["c3.b"], self.state)
        if self.fused_bwd:
            be.conv2d_bwd_data_pool(self.dz3, p["c3.w"], self.m1 if pool == "max" else None, self.a1, self.dz1,
                                    pool, act)
        else:
            be.conv2d_bwd_data(self.dz3, p["c3.w"], self.dp1)
            be.pool2x2_bwd(self.dp1, self.m1, self.a1, self.dz1, pool, act)
        be.conv2d_bwd_weight(self.x, self.dz1, g["c1.w"], g["c1.b"], self.state)

    def optimize(self) -> None:
        be = self.be
        if self.optimizer == "adam":
            be.adam_step(self.params, self.grads, self.m, self.v, self.sched, self.state, self.beta1, self.beta2,
                         self.eps, self.wd)
        else:
            be.sgd_step(self.params, self.grads, self.m, self.sched, self.state, self.momentum, self.wd)
        be.step_advance(self.state, self.batch)

    def step(self) -> None:
        """One training step: launches only (after the first call: no allocation, copy or sync)."""
        self.forward()
        self.backward()
        self.optimize()
