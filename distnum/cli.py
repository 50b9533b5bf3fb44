"""The distnum command: distnum gradcheck | bench (| train | plot)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from distnum.data import DataError, load_mnist
from distnum.gradient import DEFAULT_H, check_h


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong, and where to look), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def step_size(text: str) -> float:
    try:
        return check_h(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help="folder with the MNIST IDX files (default: "
        "DISTNUM_DATA, then the cache, then a download)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=100)
    parser.add_argument("--hidden", type=positive_int, default=50, help="hidden units")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch")
    parser.add_argument("--h", type=step_size, default=DEFAULT_H, help="the nudge (1e-4)")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="backprop SGD steps before measuring, for trained weights",
    )


def real_batch(args: argparse.Namespace):
    """x (B, 784), labels (B,) drawn from the training set, and the training set."""
    (x_train, t_train), _ = load_mnist(data_dir=args.data_dir)
    if args.batch_size > len(x_train):
        raise DataError(
            f"--batch-size {args.batch_size} is larger than the training set "
            f"({len(x_train)}); choose a smaller one"
        )
    rng = np.random.default_rng(args.seed)
    mask = rng.choice(len(x_train), args.batch_size)
    return x_train[mask], t_train[mask], x_train, t_train


def run_gradcheck(args: argparse.Namespace) -> int:
    from distnum.gradcheck import compare, train_with_backprop
    from distnum.models import TwoLayerNet

    x, labels, x_train, t_train = real_batch(args)
    rng = np.random.default_rng(args.seed)
    net = TwoLayerNet(x.shape[1], args.hidden, 10, seed=args.seed)
    train_with_backprop(net, x_train, t_train, args.train_steps, rng)
    report = compare(net, x, labels, args.h, args.full_sample, rng)
    print(
        f"gradcheck: a batch of {len(x)} MNIST images, 784-{args.hidden}-10, h {args.h:g}, "
        f"weights after {args.train_steps} backprop steps (seed {args.seed})"
    )
    print(
        f"{'array':<6}{'full checked':>13}{'max |fast-full|':>17}"
        f"{'fast vs backprop':>18}{'full vs backprop':>18}   (relative: max|a-b|/max|b|)"
    )
    failed = False
    for name, r in report.items():
        bad = (
            r["fast_vs_full_abs"] > args.abs_tol
            or max(r["fast_vs_backprop_rel"], r["full_vs_backprop_rel"]) > args.rel_tol
        )
        failed |= bad
        print(
            f"{name:<6}{r['checked_full']:>13}{r['fast_vs_full_abs']:>17.2e}"
            f"{r['fast_vs_backprop_rel']:>18.2e}{r['full_vs_backprop_rel']:>18.2e}"
            f"{'   OVER TOLERANCE' if bad else ''}"
        )
    verdict = "FAILED" if failed else "ok"
    print(
        f"tolerances: |fast-full| <= {args.abs_tol:g}, vs backprop <= {args.rel_tol:g}: {verdict}"
    )
    return 1 if failed else 0


def run_bench(args: argparse.Namespace) -> int:
    from distnum.bench import bench_engines, bench_workers, format_engine_rows, format_worker_rows

    x, labels, x_train, t_train = real_batch(args)
    report = {
        "engines": [
            bench_engines(x, labels, hidden, args.seed, args.h, args.full_sample, args.repeat)
            for hidden in (args.hidden_sizes or [args.hidden])
        ]
    }
    if args.workers:
        from distnum.distributed import connect

        owns_ray = connect(args.address)
        try:
            report["workers"] = bench_workers(
                x_train, t_train, args.workers, args.steps, args.hidden, args.seed, args.h,
                args.batch_size,
            )  # fmt: skip
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"bench: a batch of {len(x)} MNIST images, h {args.h:g}, seed {args.seed}, "
        f"{os.cpu_count()} CPUs; the engines in one process"
    )
    print(format_engine_rows(report["engines"]))
    if args.workers:
        print(
            f"\ntraining steps over Ray worker actors ({args.steps} timed steps each, "
            f"hidden {args.hidden}, batch {args.batch_size}):"
        )
        print(format_worker_rows(report["workers"]))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from distnum.training import ConfigError, TrainConfig, train

    if args.resume is not None:
        if args.out is not None and args.out != args.resume:
            raise ConfigError(f"--out {args.out} and --resume {args.resume} differ; a resumed "
                              "run goes on in its own folder: give only --resume")  # fmt: skip
        args.out, args.resume = args.resume, True
    else:
        args.resume = False
    config = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    summary = train(config)
    print(
        f"done: {summary['iters']} steps in {summary['wall_s']:.1f} s "
        f"({summary['steps_per_s']:.1f} steps/s, {summary['workers']} workers, "
        f"engine {summary['engine']}), loss {summary['final_loss']:.4g}, "
        f"train_acc {summary['train_acc']:.4f}, test_acc {summary['test_acc']:.4f}; "
        f"actors per node {summary['actors_per_node']}; outputs in {summary['out']}"
    )
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from distnum.plot import PlotError, plot_run, save_figure

    # a file is all the command makes: no window, on any machine (unless MPLBACKEND says)
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        written = save_figure(plot_run(args.run_dir), args.output)
    except (FileNotFoundError, ImportError, PlotError) as error:
        print(f"distnum: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"distnum: error: cannot write {args.output}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="distnum",
        description="Exact central-difference gradients for the chapter-4 network.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gradcheck = commands.add_parser("gradcheck", help="fast vs full engine vs backprop")
    add_batch_options(gradcheck)
    gradcheck.add_argument(
        "--full-sample",
        type=positive_int,
        default=2000,
        help="W1 coordinates the full engine checks (all of b1, W2, b2)",
    )
    gradcheck.add_argument("--abs-tol", type=float, default=1e-9)
    gradcheck.add_argument("--rel-tol", type=float, default=1e-6)
    gradcheck.set_defaults(run=run_gradcheck)

    train = commands.add_parser("train", help="the notebook's MNIST training, over Ray")
    train.add_argument("--iters", type=positive_int, default=10000)
    train.add_argument("--batch-size", type=positive_int, default=100)
    train.add_argument("--lr", type=float, default=0.1, help="learning rate")
    train.add_argument("--hidden", type=positive_int, default=50, help="hidden units")
    train.add_argument("--weight-init-std", type=float, default=0.01)
    train.add_argument(
        "--workers",
        type=positive_int,
        help="worker actors (default: the CPUs Ray reports; more share them)",
    )
    train.add_argument("--engine", choices=["fast", "full"], default="fast")
    train.add_argument("--h", type=step_size, default=DEFAULT_H, help="the nudge (1e-4)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--data-dir", help="folder with the MNIST IDX files")
    train.add_argument("--out", help="output folder (default runs/train-<time>)")
    train.add_argument(
        "--address",
        help="Ray cluster to join: auto or host:port "
        "(default: RAY_ADDRESS, else Ray on this machine)",
    )
    train.add_argument(
        "--local", action="store_true", help="compute the gradient in this process, without Ray"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                       help="write a checkpoint every N steps (default: every epoch; always "
                       "at the end)")  # fmt: skip
    train.add_argument("--resume", metavar="OUT",
                       help="go on with the run in OUT from its newest valid checkpoint, up "
                       "to --iters")  # fmt: skip
    train.add_argument("--max-worker-restarts", type=int, default=3, metavar="N",
                       help="worker actors that die are replaced and their step redone, up "
                       "to N times in a run (3)")  # fmt: skip
    train.set_defaults(run=run_train)

    bench = commands.add_parser("bench", help="seconds per gradient: full, fast, backprop")
    add_batch_options(bench)
    bench.add_argument(
        "--hidden-sizes",
        type=positive_int,
        nargs="+",
        metavar="H",
        help="several hidden sizes, e.g. 50 100 200",
    )
    bench.add_argument(
        "--full-sample",
        type=positive_int,
        default=400,
        help="coordinates the full engine is timed on",
    )
    bench.add_argument("--repeat", type=positive_int, default=20)
    bench.add_argument(
        "--workers",
        type=positive_int,
        nargs="+",
        metavar="N",
        help="also time training steps over N worker actors, e.g. 1 2",
    )
    bench.add_argument(
        "--steps", type=positive_int, default=200, help="timed training steps per worker count"
    )
    bench.add_argument("--address", help="Ray cluster for --workers (default: this machine)")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.set_defaults(run=run_bench)
    plot = commands.add_parser("plot", help="loss and accuracy curves of a run, as a PNG")
    plot.add_argument("run_dir", metavar="OUT", help="the --out folder of a distnum train run")
    plot.add_argument("-o", "--output", default="curves.png", help="PNG file (curves.png)")
    plot.set_defaults(run=run_plot)
    return parser


def exit_now(message: str, status: int) -> int:
    """Print the message and end the process here. By now the run has closed its files and
    shut its actors and Ray down; but after a compiled graph has lost an actor, the
    interpreter's own exit can crash in Ray's threads (seen as SIGSEGV after the message),
    which would hide the status."""
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    from distnum.checkpoint import CheckpointError
    from distnum.distributed import WorkerFailed
    from distnum.training import ConfigError, Diverged, Interrupted

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, DataError, ConnectionError) as error:
        print(f"distnum: error: {error}", file=sys.stderr)
        return 2
    except (WorkerFailed, Diverged) as error:
        return exit_now(f"distnum: error: {error}", 1)
    except Interrupted as interrupted:
        return exit_now(f"distnum: {interrupted}", 130)
    except KeyboardInterrupt:
        print("distnum: interrupted", file=sys.stderr)
        return 130
