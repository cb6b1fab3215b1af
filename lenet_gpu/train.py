"""Train LeNet-5: ``python -m lenet_gpu.train [options]``.

The dataset is uploaded to the backend once; each step gathers its batch on the device from a
per-epoch permutation, so a step makes no host↔device copy. With ``--augment`` (on by default) each
epoch first uploads a freshly shifted copy of the training images: one copy per epoch, none per step.
The loss is read back only when the progress bar is refreshed. Ctrl-C saves a checkpoint at the last
finished step and exits; ``--resume`` continues from it and reaches the same parameters as an
uninterrupted run with the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .augment import random_shifts
from .backends import BACKENDS, BackendUnavailable, get_backend
from .model import OPTIMIZERS, CheckpointError, LeNet5, read_checkpoint

SCHEDULES = ("onecycle", "cosine", "constant")
DEFAULTS = {
    "epochs": 15,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": None,  # adam: 2e-3 peak, sgd: 0.05 peak
    "schedule": "onecycle",
    "weight_decay": 0.0,
    "momentum": 0.9,
    "activation": "relu",
    "pool": "max",
    "f6": 84,
    "seed": 0,
    "augment": 2,
    "init": "torch",
}
DEFAULT_LR = {"adam": 2e-3, "sgd": 0.05}
# options that define a run: a resumed run takes them from its checkpoint
RUN_OPTIONS = tuple(DEFAULTS) + ("dataset", "data_dir", "limit")
EXIT_INTERRUPTED, EXIT_NONFINITE = 130, 3


class UsageError(Exception):
    """A bad argument or file: printed as one line, exit status 2."""


def lr_at(step: int, total: int, peak: float, schedule: str) -> float:
    """The learning rate of optimizer step ``step`` (0-based) out of ``total``.

    onecycle: cosine warm-up from peak/25 to peak over the first 30 % of steps, then cosine
    annealing to peak/1e4 (torch.optim.lr_scheduler.OneCycleLR's shape). cosine: from peak to 0.
    """
    if schedule == "constant" or total <= 1:
        return peak
    if schedule == "cosine":
        return 0.5 * peak * (1 + math.cos(math.pi * step / total))
    if schedule != "onecycle":
        raise ValueError(f"unknown schedule {schedule!r}")
    warm = max(1, int(0.3 * total))
    start, end = peak / 25.0, peak / 25.0 / 1e4
    if step < warm:
        t = step / warm
        return start + (peak - start) * (1 - math.cos(math.pi * t)) / 2
    t = (step - warm) / max(1, total - warm)
    return end + (peak - end) * (1 + math.cos(math.pi * t)) / 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of usage + error
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m lenet_gpu.train",
        description="Train LeNet-5 on MNIST-style digits with hand-written kernels "
        "(numpy on the CPU; numba or cupy on a CUDA GPU).",
        epilog="With no arguments: full MNIST if it is cached or can be downloaded, otherwise the bundled "
        "mnist-sample; backend auto; writes runs/lenet5.npz and runs/metrics.jsonl.",
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None, help="mnist, mnist-sample, fashion-mnist (default: auto)")
    d.add_argument("--data-dir", default=None, help="a folder holding the four IDX files (raw or .gz)")
    d.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only the first N training and N test images (quick runs)")
    d.add_argument("--no-download", action="store_true", help="never download; use cached or bundled data")
    d.add_argument("--augment", type=int, default=None, metavar="PX",
                   help="shift each training image by up to PX pixels in x and y, fresh every epoch "
                   "(default 2; 0 turns augmentation off)")
    m = p.add_argument_group("model")
    m.add_argument("--activation", choices=("relu", "tanh", "lecun_tanh", "sigmoid"), default=None,
                   help="activation of C1, C3, C5, F6 (default relu)")
    m.add_argument("--pool", choices=("max", "avg"), default=None, help="subsampling S2/S4 (default max)")
    m.add_argument("--f6", type=int, default=None, help="width of F6 (default 84)")
    m.add_argument("--init", choices=("torch", "he"), default=None,
                   help="initial weights: torch (PyTorch's default, uniform ±1/sqrt(fan_in); default) or he "
                   "(He/LeCun normal)")
    m.add_argument("--seed", type=int, default=None, help="seed of the initial weights and the shuffles (default 0)")
    t = p.add_argument_group("training")
    t.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="where the kernels run (default auto: cupy, then numba, on a GPU; numpy otherwise)")
    t.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULTS['epochs']}")
    t.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default adam")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 2e-3 for adam, 0.05 for sgd)")
    t.add_argument("--schedule", choices=SCHEDULES, default=None, help="learning-rate schedule (default onecycle)")
    t.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay (default 0)")
    t.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    t.add_argument("--cuda-graphs", action="store_true",
                   help="cupy backend: capture each step's forward+backward once as a CUDA graph and replay it "
                   "(not yet proven on a GPU, hence off by default)")
    t.add_argument("--eval-batch-size", type=int, default=1000, help="batch size of evaluation (default 1000)")
    o = p.add_argument_group("output")
    o.add_argument("--checkpoint", default="runs/lenet5.npz",
                   help="checkpoint written after every epoch and on Ctrl-C (default runs/lenet5.npz)")
    o.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run saved in --checkpoint (or in CHECKPOINT)")
    o.add_argument("--metrics", default=None,
                   help="JSON-lines metrics file, one line per epoch (default: metrics.jsonl beside the checkpoint)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--log-every", type=int, default=None,
                   help="read the loss back every N steps (default: every step on the CPU, 50 on a GPU)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulated Ctrl-C
    return p


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'} (got {value})")


def _resolve_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict | None]:
    """Merge defaults, the command line and, when resuming, the checkpoint's run."""
    given = {k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k, None) is not None}
    resume_state = None
    if args.resume is not None:
        path = Path(args.checkpoint if args.resume is True else args.resume)
        try:
            ck = read_checkpoint(path)
        except CheckpointError as e:
            raise UsageError(f"cannot resume: {e}") from None
        run = ck["extra"].get("run")
        if not isinstance(run, dict) or "state" not in ck["extra"]:
            raise UsageError(f"cannot resume: {path} was not written by lenet_gpu.train")
        for k, v in given.items():
            if run.get(k) != v:
                raise UsageError(
                    f"--{k.replace('_', '-')} {v} differs from the resumed run's {run.get(k)!r}; "
                    "a resumed run keeps its options"
                )
        opts = dict(run)
        resume_state = {"path": path, **ck["extra"]["state"]}
        args.checkpoint = str(path)
    else:
        opts = {**DEFAULTS, "dataset": None, "data_dir": None, "limit": None, **given}
        if opts["lr"] is None:
            opts["lr"] = DEFAULT_LR[opts["optimizer"]]
    for k in ("epochs", "batch_size", "f6", "limit"):
        _positive(k, opts.get(k))
    for k in ("lr", "weight_decay", "momentum", "augment"):
        _positive(k, opts.get(k), allow_zero=k != "lr")
    if opts.get("augment", 0) > 4:
        raise UsageError(f"--augment must be at most 4 pixels (got {opts['augment']})")
    _positive("eval_batch_size", args.eval_batch_size)
    return opts, resume_state


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts, resume = _resolve_options(args)

    from .data import DataError, load_dataset

    if args.cuda_graphs:
        os.environ["LENET_GPU_CUDA_GRAPHS"] = "1"
    try:  # before any data work, so a missing GPU is reported at once
        backend = get_backend(args.backend)
    except BackendUnavailable as e:
        raise UsageError(str(e)) from None
    try:
        ds = load_dataset(opts["dataset"], data_dir=opts["data_dir"], download=not args.no_download,
                          progress=not args.no_progress)
    except DataError as e:
        raise UsageError(str(e)) from None
    train_x, train_y, test_x, test_y = ds.train_images, ds.train_labels, ds.test_images, ds.test_labels
    if opts["limit"]:
        train_x, train_y = train_x[: opts["limit"]], train_y[: opts["limit"]]
        test_x, test_y = test_x[: opts["limit"]], test_y[: opts["limit"]]
    opts["dataset"] = opts["dataset"] or ds.name
    n_train = train_x.shape[0]
    batch = min(opts["batch_size"], n_train)
    steps_per_epoch = n_train // batch
    total_steps = steps_per_epoch * opts["epochs"]
    pixels = train_x.astype(np.float32) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    del pixels

    model_opts = {k: opts[k] for k in ("activation", "pool", "f6", "seed", "optimizer", "lr", "weight_decay",
                                        "momentum", "init")}
    try:
        if resume:
            model, _ = LeNet5.load_with_extra(resume["path"], backend=backend)
        else:
            model = LeNet5(backend=backend, mean=mean, std=std, **model_opts)
    except CheckpointError as e:
        raise UsageError(str(e)) from None

    be = model.backend
    ckpt = Path(args.checkpoint)
    metrics_path = Path(args.metrics) if args.metrics else ckpt.parent / "metrics.jsonl"
    log_every = args.log_every or (50 if be.is_gpu else 1)
    show = not args.no_progress
    print(f"dataset: {ds.name} ({n_train} train / {test_x.shape[0]} test images) from {ds.source}")
    print(f"backend: {be.name}   model: LeNet-5 {model.activation}/{model.pool}/F6={model.cfg.f6}, "
          f"{model.num_parameters:,} parameters   optimizer: {opts['optimizer']} lr {opts['lr']:g} "
          f"{opts['schedule']}, batch {batch}, {opts['epochs']} epochs, "
          f"{'shifts up to ' + str(opts['augment']) + ' px' if opts.get('augment') else 'no augmentation'}")

    train_data = model.upload_dataset(train_x, train_y)
    test_data = model.upload_dataset(test_x, test_y)

    start_epoch, start_step, carry = 0, 0, (0.0, 0, 0.0)
    if resume:
        start_epoch, start_step = int(resume["epoch"]), int(resume["step_in_epoch"])
        carry = (float(resume["loss_sum"]), int(resume["correct"]), float(resume["seconds"]))
        if model.step_count != start_epoch * steps_per_epoch + start_step:
            raise UsageError(f"cannot resume: {resume['path']} does not match its recorded position")
        print(f"resuming {resume['path']} at epoch {start_epoch + 1}, step {start_step}")
        if start_epoch >= opts["epochs"]:
            print("this run is already complete")
            return 0

    interrupted = {"flag": False}

    def on_sigint(signum, frame):  # noqa: ARG001
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)

    def save(epoch: int, step_in_epoch: int, loss_sum: float, correct: int, seconds: float) -> None:
        extra = {"dataset": opts["dataset"], "data_dir": opts["data_dir"], "epoch": epoch,
                 "run": opts, "state": {"epoch": epoch, "step_in_epoch": step_in_epoch, "loss_sum": loss_sum,
                                        "correct": correct, "seconds": seconds}}
        model.save(ckpt, extra=extra)

    steps_done_run = 0
    test_acc, rate = float("nan"), float("nan")
    t_run = time.perf_counter()
    train_seconds_total = 0.0
    try:
        for epoch in range(start_epoch, opts["epochs"]):
            perm = np.random.default_rng([opts["seed"], epoch]).permutation(n_train).astype(np.int32)
            model.begin_epoch(train_data, perm)
            if opts.get("augment"):  # this epoch's shifted copy of the training images (one copy per epoch)
                model.replace_images(train_data, random_shifts(train_x, np.random.default_rng([opts["seed"], epoch, 1]),
                                                               opts["augment"]))
            first = start_step if epoch == start_epoch else 0
            loss_sum, correct, seconds = carry if epoch == start_epoch else (0.0, 0, 0.0)
            model.read_stats()  # reset the device accumulators
            bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{opts['epochs']}", show)
            bar.update(first)
            t0 = time.perf_counter()
            last_read = first
            s = first
            while s < steps_per_epoch:
                gstep = epoch * steps_per_epoch + s
                model.step(train_data, s * batch, batch, lr_at(gstep, total_steps, opts["lr"], opts["schedule"]))
                s += 1
                steps_done_run += 1
                if s - last_read >= log_every or s == steps_per_epoch:
                    ls, c = model.read_stats()
                    if not math.isfinite(ls):
                        bar.close()
                        where = (f"step {gstep + 1}" if s - last_read == 1
                                 else f"steps {gstep + 2 - (s - last_read)}–{gstep + 1}")
                        print(f"error: the loss became {ls} at {where} (epoch {epoch + 1}); stopping. "
                              f"Try a lower --lr. The last checkpoint ({ckpt}) is left as it was.",
                              file=sys.stderr)
                        return EXIT_NONFINITE
                    loss_sum += ls
                    correct += c
                    bar.set_postfix(loss=f"{loss_sum / (s * batch):.4f}", acc=f"{correct / (s * batch):.3f}")
                    bar.update(s - last_read)
                    last_read = s
                if args.stop_after is not None and steps_done_run >= args.stop_after:
                    interrupted["flag"] = True
                if interrupted["flag"]:
                    break
            if interrupted["flag"]:
                # fold what was not yet read into the saved totals, then save at this step boundary
                ls, c = model.read_stats()
                be.synchronize()
                elapsed = seconds + time.perf_counter() - t0
                bar.close()
                save(epoch, s, loss_sum + ls, correct + c, elapsed)
                print(f"\ninterrupted at epoch {epoch + 1}, step {s}/{steps_per_epoch}: saved {ckpt}; "
                      f"continue with --resume", file=sys.stderr)
                return EXIT_INTERRUPTED
            be.synchronize()
            seconds += time.perf_counter() - t0
            train_seconds_total += time.perf_counter() - t0
            bar.close()
            n_seen = steps_per_epoch * batch
            test_loss, test_correct = model.evaluate(test_data, args.eval_batch_size)
            test_acc = test_correct / test_data.n
            rate = (steps_per_epoch - first) * batch / max(time.perf_counter() - t0, 1e-9)
            rec = {"epoch": epoch + 1, "loss": loss_sum / n_seen, "train_acc": correct / n_seen,
                   "test_loss": test_loss / test_data.n, "test_acc": test_acc, "images_per_s": rate,
                   "seconds": seconds, "lr": lr_at(min(total_steps - 1, (epoch + 1) * steps_per_epoch - 1),
                                                    total_steps, opts["lr"], opts["schedule"]),
                   "dataset": opts["dataset"], "backend": be.name}
            print(f"epoch {epoch + 1:3d}/{opts['epochs']}  loss {rec['loss']:.4f}  train {rec['train_acc']:.4f}  "
                  f"test {test_acc:.4f}  {_rate(rate)} img/s  {seconds:.1f}s")
            save(epoch + 1, 0, 0.0, 0, 0.0)
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(metrics_path, "a" if (epoch > 0 or resume) else "w") as f:
                f.write(json.dumps(rec) + "\n")
    finally:
        signal.signal(signal.SIGINT, old_handler)

    wall = time.perf_counter() - t_run
    overall = steps_done_run * batch / max(train_seconds_total, 1e-9)
    print(f"done: test accuracy {test_acc:.4f} on {ds.name} after {opts['epochs']} epochs; "
          f"training {_rate(overall)} img/s on {be.name}; {wall:.1f}s in all; checkpoint {ckpt}, "
          f"metrics {metrics_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UsageError as e:
        print(f"lenet_gpu.train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lenet_gpu.train: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        print(f"lenet_gpu.train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
