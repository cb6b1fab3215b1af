"""PyTorch's plain recipe for LeNet-5, the figure the training program's defaults are compared with.

    python -m bench.peer_recipe fashion-mnist --seeds 0,1,2      # one JSON line per epoch and seed

The same network as lenet_gpu/perf/peer.py (conv 5×5 1→6, relu, max-pool 2, conv 5×5 6→16, relu, max-pool 2,
dense 400→120→84→10 with relu), PyTorch's default initialisation, Adam (lr 1e-3, torch defaults
otherwise), batch 128, a fresh shuffle every epoch (the last partial batch kept, as DataLoader does), no
augmentation, a constant learning rate; input padded 28→32 and normalised by the training set's
mean and standard deviation. Test accuracy after every epoch. Needs torch.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def run(dataset: str, seed: int, epochs: int = 10, batch: int = 128, lr: float = 1e-3) -> list[dict]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    from lenet_gpu.data import load_dataset
    from lenet_gpu.perf.peer import lenet_module
    from lenet_gpu.spec import NetConfig

    torch.manual_seed(seed)
    ds = load_dataset(dataset, download=False, progress=False)
    px = ds.train_images.astype(np.float32) / 255.0
    mean, std = float(px.mean()), float(px.std())

    def prep(u8: np.ndarray):
        x = torch.from_numpy(u8).float().div_(255.0).sub_(mean).div_(std)
        return F.pad(x, (2, 2, 2, 2)).unsqueeze(1)

    net = lenet_module(NetConfig())  # the peer's network (lenet_gpu.perf.peer), PyTorch's default init
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xtr, ytr = prep(ds.train_images), torch.from_numpy(ds.train_labels.astype(np.int64))
    xte, yte = prep(ds.test_images), torch.from_numpy(ds.test_labels.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    out = []
    for ep in range(epochs):
        t0 = time.time()
        net.train()
        perm = torch.randperm(xtr.shape[0], generator=g)
        for s in range(0, xtr.shape[0], batch):
            idx = perm[s : s + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
        net.eval()
        with torch.inference_mode():
            acc = float((net(xte).argmax(1) == yte).float().mean())
        rec = {"recipe": "torch-plain", "dataset": dataset, "seed": seed, "epoch": ep + 1, "test_acc": round(acc, 4),
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer_recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="mnist, mnist-sample or fashion-mnist")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--epochs", type=int, default=10)
    a = p.parse_args(argv)
    for seed in (int(v) for v in a.seeds.split(",")):
        run(a.dataset, seed, a.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
