"""Train LeNet-5: ``python -m lenet_gpu.train [options]``.

The dataset is uploaded to the backend once. Each step gathers its batch on the device from the
epoch's permutation (the only upload of an epoch) and draws its augmentation shifts on the device
from (seed, epoch, sample); the step counter, learning rate and Adam's bias corrections live on the
device too, so the host only issues steps: chunks of K steps, each one CUDA graph on a GPU backend
that has them. Per-step loss and accuracy are read back once per chunk (``--log-every``), which is
also when the progress bar moves and a NaN is found (naming its step). Ctrl-C saves a checkpoint at
the end of the chunk and exits; ``--resume`` continues from it and reaches the same parameters as an
uninterrupted run with the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .backends import BACKENDS, BackendUnavailable, get_backend
from .model import OPTIMIZERS, CheckpointError, LeNet5, read_checkpoint
from .recipe import DATASET_DEFAULTS, DEFAULT_LR, DEFAULTS, DIR_DEFAULTS
from .runs import RUNS_DIR, NoRun, latest_checkpoint, metrics_path_for, new_checkpoint
from .schedule import SCHEDULES, lr_at

# options that define a run: a resumed run takes them from its checkpoint
RUN_OPTIONS = tuple(DEFAULTS) + ("dataset", "data_dir", "limit")
EXIT_INTERRUPTED, EXIT_NONFINITE = 130, 3
GPU_CHUNK, CPU_CHUNK = 100, 10  # steps per chunk (per graph; per read of the statistics)


class UsageError(Exception):
    """A bad argument or file: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of usage + error
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m lenet_gpu.train",
        description="Train LeNet-5 on MNIST-style 28x28 images with hand-written kernels: CUDA C (cupy) or "
        "Numba (numba) on a CUDA GPU; Numba @njit kernels (cpu) or plain NumPy (numpy) on the CPU. Prints a "
        "progress bar and a line per epoch (loss, train and test accuracy, images/s) and writes a checkpoint "
        "and a metrics file.",
        epilog="With no arguments: full MNIST if it is cached or can be downloaded, otherwise the bundled "
        "mnist-sample (5,000 digits; the default recipe reaches about 98% test accuracy on it); backend auto; "
        "writes runs/lenet5.npz and runs/lenet5.metrics.jsonl, or runs/lenet5-2.npz, ... when an earlier run "
        "holds that name (runs never overwrite each other). evaluate, visualize and predict then take the latest "
        "run.",
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None, help="mnist, mnist-sample, fashion-mnist (default: auto)")
    d.add_argument("--data-dir", default=None, help="a folder holding the four IDX files (raw or .gz)")
    d.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use a fixed sample of N training and N test images, the classes in their proportions "
                   "(quick runs)")
    d.add_argument("--no-download", action="store_true", help="never download; use cached or bundled data")
    d.add_argument("--augment", type=int, default=None, metavar="PX",
                   help="shift each training image by up to PX pixels in x and y, drawn afresh every epoch on the "
                   "device (0 turns augmentation off). Default per dataset: "
                   + ", ".join(f"{k} {v['augment']}" for k, v in DATASET_DEFAULTS.items())
                   + f", a --data-dir folder {DIR_DEFAULTS['augment']}")
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
                   help="where the kernels run (default auto: cupy, then numba, when a CUDA GPU is present; cpu "
                   "otherwise, numpy where Numba is not installed)")
    t.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULTS['epochs']}")
    t.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default adam")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 2e-3 for adam, 0.05 for sgd)")
    t.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule: onecycle (warm-up, then cosine annealing), cosine, constant, or hold "
                   "(the peak for 70%% of the steps, then cosine annealing). Default per dataset: "
                   + ", ".join(f"{k} {v.get('schedule', DEFAULTS['schedule'])}" for k, v in DATASET_DEFAULTS.items())
                   + f", a --data-dir folder {DIR_DEFAULTS.get('schedule', DEFAULTS['schedule'])}")
    t.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay (default 0)")
    t.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    t.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture --log-every steps as one CUDA graph and replay it (default: on where the backend "
                   "has graphs, cupy and numba on a GPU, after a bit-for-bit check against eager launches; "
                   "--no-cuda-graphs: off)")
    t.add_argument("--eval-batch-size", type=int, default=1000, help="batch size of evaluation (default 1000)")
    o = p.add_argument_group("output")
    o.add_argument("--checkpoint", default=None,
                   help="checkpoint written after every epoch and on Ctrl-C (default: a new file for each run, "
                   "runs/lenet5.npz, then runs/lenet5-2.npz, ...). An existing one is refused unless --overwrite "
                   "or --resume")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an existing --checkpoint and its metrics file (otherwise refused)")
    o.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run saved in CHECKPOINT (default: --checkpoint, or the latest run in runs/)")
    o.add_argument("--metrics", default=None,
                   help="JSON-lines metrics file, one line per epoch (default: the checkpoint's name with "
                   ".metrics.jsonl, e.g. runs/lenet5.metrics.jsonl)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--log-every", type=int, default=None,
                   help="steps per chunk: the host issues this many steps (one CUDA graph where graphs are on), "
                   f"then reads their loss and accuracy back (default {GPU_CHUNK} on a GPU, {CPU_CHUNK} on the CPU)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulated Ctrl-C
    return p


def _rate(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'} (got {value})")


def _resolve_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict | None]:
    """Merge defaults, the command line and, when resuming, the checkpoint's run (by default the latest run).
    The dataset's own defaults (DATASET_DEFAULTS) are applied once the dataset is known (``_dataset_defaults``)."""
    given = {k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k, None) is not None}
    args.given = set(given)
    resume_state = None
    if args.resume is not None:
        if args.resume is not True:
            path = Path(args.resume)
        elif args.checkpoint is not None:
            path = Path(args.checkpoint)
        else:
            try:
                path = latest_checkpoint(RUNS_DIR)
            except NoRun as e:
                raise UsageError(f"cannot resume: {e}") from None
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


def _progress(total: int, desc: str, enabled: bool, initial: int = 0, file: Any = None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not enabled, dynamic_ncols=True,
                file=file or sys.stderr, initial=initial)


def _finish(bar: Any) -> None:
    """Draw the bar's last count (100% at the end of an epoch) even when it came sooner than tqdm redraws,
    then close it."""
    if not bar.disable:
        bar.refresh()
    bar.close()


def _restart_clock(bar: Any) -> None:
    """Start the bar's clock again from where it is: its rate and ETA leave out the steps before (the run's
    first step, which compiles the kernels and would make the ETA of a 3-second epoch read half an hour)."""
    done = bar.n
    bar.reset()
    bar.initial = bar.n = bar.last_print_n = done
    if not bar.disable:
        bar.refresh()


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts, resume = _resolve_options(args)

    from .data import DataError, load_dataset, stratified_indices

    try:  # before any data work, so a missing GPU is reported at once
        backend = get_backend(args.backend)
    except BackendUnavailable as e:
        raise UsageError(str(e)) from None
    if args.checkpoint is None:  # a new run: a name no run has taken
        args.checkpoint = str(new_checkpoint(RUNS_DIR))
    ckpt = Path(args.checkpoint)
    metrics_path = Path(args.metrics) if args.metrics else metrics_path_for(ckpt)
    for path in (ckpt, metrics_path):
        _check_writable(path)
    if not resume and not args.overwrite:  # never replace another run's files without being told
        for path, what in ((ckpt, "checkpoint"), (metrics_path, "metrics file")):
            if path.exists():
                raise UsageError(f"{path} exists (another run's {what}); pass --overwrite to replace it, --resume to "
                                 "continue that run, or another --checkpoint")
    try:
        ds = load_dataset(opts["dataset"], data_dir=opts["data_dir"], download=not args.no_download,
                          progress=not args.no_progress)
    except DataError as e:
        raise UsageError(str(e)) from None
    train_x, train_y, test_x, test_y = ds.train_images, ds.train_labels, ds.test_images, ds.test_labels
    if opts["limit"]:  # a fixed, stratified sample: every class as often as in the whole set
        keep = stratified_indices(train_y, opts["limit"])
        train_x, train_y = train_x[keep], train_y[keep]
        keep = stratified_indices(test_y, opts["limit"])
        test_x, test_y = test_x[keep], test_y[keep]
    opts["dataset"] = opts["dataset"] or ds.name
    if not resume:  # a resumed run keeps the options it was started with
        for k, v in (DATASET_DEFAULTS.get(ds.name) or DIR_DEFAULTS).items():
            if k not in args.given:
                opts[k] = v
    n_train = train_x.shape[0]
    batch = min(opts["batch_size"], n_train)
    steps_per_epoch = n_train // batch
    total_steps = steps_per_epoch * opts["epochs"]
    pixels = train_x.astype(np.float32) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    del pixels

    graphs = args.cuda_graphs if args.cuda_graphs is not None else True
    model_opts = {k: opts[k] for k in ("activation", "pool", "f6", "seed", "optimizer", "lr", "weight_decay",
                                        "momentum", "init")}
    try:
        if resume:
            model, _ = LeNet5.load_with_extra(resume["path"], backend=backend, use_graphs=graphs)
        else:
            model = LeNet5(backend=backend, mean=mean, std=std, use_graphs=graphs, **model_opts)
    except CheckpointError as e:
        raise UsageError(str(e)) from None

    be = model.backend
    chunk = min(args.log_every or (GPU_CHUNK if be.is_gpu else CPU_CHUNK), steps_per_epoch)
    model.graph_steps = chunk
    show = not args.no_progress
    print(f"dataset: {ds.name} ({n_train} train / {test_x.shape[0]} test images) from {ds.source}")
    print(f"backend: {be.name}   model: LeNet-5 {model.activation}/{model.pool}/F6={model.cfg.f6}, "
          f"{model.num_parameters:,} parameters   optimizer: {opts['optimizer']} lr {opts['lr']:g} "
          f"{opts['schedule']}, batch {batch}, {opts['epochs']} epochs, "
          f"{'shifts up to ' + str(opts['augment']) + ' px' if opts.get('augment') else 'no augmentation'}")
    print(f"writes: {ckpt} (checkpoint, after every epoch) and {metrics_path} (metrics)"
          + (f"; resuming {resume['path']}" if resume else ""))
    if args.cuda_graphs and be.graph(lambda: None, 1) is None:
        print(f"note: the {be.name} backend has no CUDA graphs; --cuda-graphs changes nothing here")

    train_data = model.upload_dataset(train_x, train_y)
    test_data = model.upload_dataset(test_x, test_y)
    first_run = getattr(be, "first_run_note", None)
    if first_run is not None and (note := first_run()):
        print(f"note: {note}")

    start_epoch, start_step, carry = 0, 0, (0.0, 0, 0.0)
    run_id = uuid.uuid4().hex[:12]
    if resume:
        start_epoch, start_step = int(resume["epoch"]), int(resume["step_in_epoch"])
        carry = (float(resume["loss_sum"]), int(resume["correct"]), float(resume["seconds"]))
        run_id = str(resume.get("run_id") or run_id)
        if model.step_count != start_epoch * steps_per_epoch + start_step:
            raise UsageError(f"cannot resume: {resume['path']} does not match its recorded position")
        print(f"resuming {resume['path']} at epoch {start_epoch + 1}, step {start_step}")
        if start_epoch >= opts["epochs"]:
            print("this run is already complete")
            return 0
    first_global = start_epoch * steps_per_epoch + start_step
    lrs = [lr_at(t, total_steps, opts["lr"], opts["schedule"]) for t in range(first_global, max(total_steps, 1))]
    model.begin_run(train_data, batch, lrs or [opts["lr"]], seed=opts["seed"], shift=opts.get("augment") or 0,
                    epoch=start_epoch, step_in_epoch=start_step)

    interrupted = {"flag": False}

    def on_sigint(signum, frame):  # noqa: ARG001
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)

    def save(epoch: int, step_in_epoch: int, loss_sum: float, correct: int, seconds: float) -> None:
        extra = {"dataset": opts["dataset"], "data_dir": opts["data_dir"], "epoch": epoch, "run_id": run_id,
                 "run": opts, "state": {"epoch": epoch, "step_in_epoch": step_in_epoch, "loss_sum": loss_sum,
                                        "correct": correct, "seconds": seconds, "run_id": run_id}}
        model.save(ckpt, extra=extra)

    steps_done_run = 0
    test_acc = float("nan")
    t_run = time.perf_counter()
    train_seconds_total = 0.0
    warm_s = 0.0  # the run's first step: compiles the kernels (and records the step), timed apart
    graph_told = False
    try:
        for epoch in range(start_epoch, opts["epochs"]):
            perm = np.random.default_rng([opts["seed"], epoch]).permutation(n_train).astype(np.int32)
            model.begin_epoch(train_data, perm)
            first = start_step if epoch == start_epoch else 0
            loss_sum, correct, seconds = carry if epoch == start_epoch else (0.0, 0, 0.0)
            bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{opts['epochs']}", show, initial=first)
            t0 = time.perf_counter()
            epoch_warm = 0.0
            s = first
            while s < steps_per_epoch:
                count = 1 if steps_done_run == 0 else min(chunk, steps_per_epoch - s)
                tc = time.perf_counter()
                model.run_steps(train_data, count)
                rows = model.step_stats(s, count)  # waits for the chunk: one copy
                if steps_done_run == 0:
                    warm_s = epoch_warm = time.perf_counter() - tc
                if not graph_told and model.graph_note:
                    print(f"note: {model.graph_note}; running eagerly", file=sys.stderr)
                    graph_told = True
                bad = np.flatnonzero(~np.isfinite(rows[:, 0]))
                if bad.size:
                    bar.close()
                    gstep = epoch * steps_per_epoch + s + int(bad[0])
                    print(f"error: the loss became {rows[bad[0], 0]} at step {gstep + 1} (epoch {epoch + 1}); "
                          f"stopping. Try a lower --lr. The last checkpoint ({ckpt}) is left as it was.",
                          file=sys.stderr)
                    return EXIT_NONFINITE
                loss_sum += float(rows[:, 0].sum())
                correct += int(round(float(rows[:, 1].sum())))
                s += count
                steps_done_run += count
                bar.set_postfix(loss=f"{loss_sum / (s * batch):.4f}", acc=f"{correct / (s * batch):.3f}")
                bar.update(count)
                if steps_done_run == 1:  # the run's first step (compiling): off the clock
                    _restart_clock(bar)
                if args.stop_after is not None and steps_done_run >= args.stop_after:
                    interrupted["flag"] = True
                if interrupted["flag"]:
                    break
            elapsed = time.perf_counter() - t0  # the chunk's statistics were read: its steps are done
            seconds += elapsed
            train_seconds_total += elapsed
            _finish(bar)
            if interrupted["flag"] and s < steps_per_epoch:
                save(epoch, s, loss_sum, correct, seconds)
                print(f"\ninterrupted at epoch {epoch + 1}, step {s}/{steps_per_epoch}: saved {ckpt}; "
                      f"continue with --resume", file=sys.stderr)
                return EXIT_INTERRUPTED
            n_seen = steps_per_epoch * batch
            test_loss, test_correct = model.evaluate(test_data, args.eval_batch_size)
            test_acc = test_correct / test_data.n
            timed_steps = steps_per_epoch - first - (1 if epoch_warm else 0)
            rate = timed_steps * batch / max(elapsed - epoch_warm, 1e-9) if timed_steps else float("nan")
            rec = {"epoch": epoch + 1, "loss": loss_sum / n_seen, "train_acc": correct / n_seen,
                   "test_loss": test_loss / test_data.n, "test_acc": test_acc,
                   "images_per_s": rate if math.isfinite(rate) else None,
                   "seconds": seconds, "lr": lr_at(min(total_steps - 1, (epoch + 1) * steps_per_epoch - 1),
                                                    total_steps, opts["lr"], opts["schedule"]),
                   "dataset": opts["dataset"], "backend": be.name, "run_id": run_id}
            print(f"epoch {epoch + 1:3d}/{opts['epochs']}  loss {rec['loss']:.4f}  train {rec['train_acc']:.4f}  "
                  f"test {test_acc:.4f}  {_rate(rate)} img/s training  {seconds:.1f}s")
            save(epoch + 1, 0, 0.0, 0, 0.0)
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(metrics_path, "a" if (epoch > 0 or resume) else "w") as f:
                f.write(json.dumps(rec) + "\n")
            if interrupted["flag"]:
                print(f"\ninterrupted after epoch {epoch + 1}: saved {ckpt}; continue with --resume", file=sys.stderr)
                return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, old_handler)

    wall = time.perf_counter() - t_run
    overall = ((steps_done_run - 1) * batch / max(train_seconds_total - warm_s, 1e-9) if steps_done_run > 1
               else float("nan"))
    print(f"done: test accuracy {test_acc:.4f} on {ds.name} after {opts['epochs']} epochs; "
          f"{_rate(overall)} img/s training on {be.name} (as each epoch's figure: training steps only, without "
          f"evaluation and without the run's first step, {warm_s:.1f}s, which compiles the kernels); "
          f"{wall:.1f}s in all; checkpoint {ckpt}, metrics {metrics_path}")
    return 0


def _check_writable(path: Path) -> None:
    """Fail before any work when ``path`` cannot be written (its folder cannot be made or written)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")


def main(argv: list[str] | None = None) -> int:
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a NaN stop says what happened
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
