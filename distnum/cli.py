"""The distnum command: distnum gradcheck | bench (| train | plot)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from typing import TYPE_CHECKING

from distnum.stopping import StopRequests

if TYPE_CHECKING:
    import numpy as np


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong, and where to look), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"distnum: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, where it has one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def whole_number(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    parse.__name__ = "whole number"
    return parse


positive_int = whole_number(1)


def step_size(text: str) -> float:
    from distnum.gradient import check_h

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return check_h(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def init_std(text: str) -> float | str:
    """--weight-init-std: a number (checked with the other settings), or relu (He) or
    sigmoid (Xavier)."""
    from distnum.models import INIT_NAMES, init_name

    if init_name(text) in INIT_NAMES:
        return init_name(text)
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor one of "
                                         f"{', '.join(INIT_NAMES)}") from None  # fmt: skip


def add_architecture_options(parser: argparse.ArgumentParser, defaults: dict | None,
                             tail: str = "") -> None:  # fmt: skip
    """--hidden, --activation, --weight-decay, --weight-init-std: the network, chapter 4's
    784-50-10 sigmoid net unless told otherwise. defaults None: left as None (train
    resolves them, a resumed run keeping its own); tail ends each default's text."""
    from distnum.models import ACTIVATIONS

    options = (
        ("hidden", {"type": positive_int, "nargs": "+", "metavar": "N"},
         "hidden units, one number per hidden layer: 50 (the chapter's), 100 100 (chapter 6's)",
         "50"),
        ("activation", {"choices": list(ACTIVATIONS)}, "the hidden layers' activation",
         "sigmoid"),
        ("weight-decay", {"type": float, "metavar": "LAMBDA"},
         "the loss adds 0.5 * LAMBDA * sum(W ** 2), as chapter 6's MultiLayerNet", "0"),
        ("weight-init-std", {"type": init_std, "metavar": "STD"},
         "initial weights' scale: a number, relu (He) or sigmoid (Xavier)",
         "0.01 for sigmoid, relu for relu"),
    )  # fmt: skip
    for name, kind, text, shown in options:
        if defaults is not None:
            kind = {**kind, "default": defaults[name.replace("-", "_")]}
        parser.add_argument(f"--{name}", help=f"{text} (default {shown}{tail})", **kind)


def net_from_args(args: argparse.Namespace, input_size: int, hidden: list[int] | None = None):
    """The MultiLayerNet the architecture options describe (with other hidden sizes, if
    given), seeded by --seed."""
    from distnum.models import MultiLayerNet, default_init_std
    from distnum.training import TrainConfig, check_config

    # checked as train checks them, so that a message names the option
    check_config(TrainConfig(hidden=args.hidden, activation=args.activation,
                             weight_decay=args.weight_decay,
                             weight_init_std=args.weight_init_std))  # fmt: skip
    std = args.weight_init_std
    std = default_init_std(args.activation) if std is None else std
    return MultiLayerNet(input_size, hidden or args.hidden, 10, args.activation, std,
                         args.weight_decay, seed=args.seed)  # fmt: skip


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help="folder with the MNIST IDX files (default: "
        "DISTNUM_DATA, then the cache, then a download)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=100,
        help="images in the batch, drawn from the training set (by --seed)",
    )
    add_architecture_options(parser, {"hidden": [50], "activation": "sigmoid",
                                      "weight_decay": 0.0, "weight_init_std": None})  # fmt: skip
    parser.add_argument("--seed", type=whole_number(0), default=0, help="weights and batch")
    parser.add_argument("--h", type=step_size, default=1e-4, help="the nudge")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="backprop SGD steps before measuring, for trained weights",
    )


def real_batch(args: argparse.Namespace):
    """x (B, 784), labels (B,) drawn from the training set, and the training set."""
    import numpy as np

    from distnum.data import DataError, load_mnist

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
    import numpy as np

    from distnum.gradcheck import compare, train_with_backprop

    if args.truth_sample:
        try:
            import mpmath  # noqa: F401 (the 50-digit column's)
        except ImportError:
            print("distnum: error: the 50-digit column needs mpmath: pip install "
                  "'distnum[check]', or give --truth-sample 0", file=sys.stderr)  # fmt: skip
            return 2
    x, labels, x_train, t_train = real_batch(args)
    rng = np.random.default_rng(args.seed)
    net = net_from_args(args, x.shape[1])
    train_with_backprop(net, x_train, t_train, args.train_steps, rng)
    report = compare(net, x, labels, args.h, args.full_sample, rng, args.truth_sample)
    print(
        f"gradcheck: a batch of {len(x)} MNIST images, {net.layout.describe()}, h {args.h:g}, "
        f"weights after {args.train_steps} backprop steps (seed {args.seed})"
    )
    truth = args.truth_sample > 0
    print(
        f"{'array':<6}{'full checked':>13}{'max |fast-full|':>17}{'near kink':>11}"
        f"{'fast vs backprop':>18}{'full vs backprop':>18}"
        + (f"{'truth checked':>14}{'|fast-truth|':>14}{'|full-truth|':>14}" if truth else "")
    )
    failed = False
    for name, r in report.items():
        bad = (
            r["fast_vs_full_abs"] > args.abs_tol
            or max(r["fast_vs_backprop_rel"], r["full_vs_backprop_rel"]) > args.rel_tol
            or (truth and r["fast_vs_truth_abs"] > args.truth_tol)
        )
        failed |= bad
        print(
            f"{name:<6}{r['checked_full']:>13}{r['fast_vs_full_abs']:>17.2e}{r['near_kink']:>11}"
            f"{r['fast_vs_backprop_rel']:>18.2e}{r['full_vs_backprop_rel']:>18.2e}"
            + (f"{r['checked_truth']:>14}{r['fast_vs_truth_abs']:>14.2e}"
               f"{r['full_vs_truth_abs']:>14.2e}" if truth else "")
            + f"{'   OVER TOLERANCE' if bad else ''}"
        )  # fmt: skip
    verdict = "FAILED" if failed else "ok"
    print(
        "vs backprop: max |a - backprop| / max |backprop|"
        + (", over the parameters whose nudge reaches no ReLU kink (a central difference "
           "across one is no derivative; near kink: how many may)"
           if net.layout.activation == "relu" else "")
    )  # fmt: skip
    if truth:
        at_kink = sum(r["truth_at_kink"] for r in report.values())
        print(
            "truth: the same central difference with every nudged loss evaluated to 50 digits "
            "(mpmath)" + (f"; {at_kink} that carry a unit above the first hidden layer across "
                          "its kink left out (docs/engines.md)" if at_kink else "")
        )  # fmt: skip
    print(
        f"tolerances: |fast-full| <= {args.abs_tol:g}, vs backprop <= {args.rel_tol:g}"
        + (f", |fast-truth| <= {args.truth_tol:g}" if truth else "")
        + f": {verdict}"
    )
    return 1 if failed else 0


def run_bench(args: argparse.Namespace) -> int:
    from distnum.bench import bench_engines, bench_workers, format_engine_rows, format_worker_rows

    x, labels, x_train, t_train = real_batch(args)
    if args.model:
        return run_model(args, x_train, t_train)
    with json_alone_on_stdout(args.json):
        architectures = [[size] for size in args.hidden_sizes or []] or [args.hidden]
        report = {
            "engines": [
                bench_engines(x, labels, net_from_args(args, x.shape[1], hidden), args.seed,
                              args.h, args.full_sample, args.repeat)
                for hidden in architectures
            ]
        }  # fmt: skip
        if args.workers:
            from distnum.cost_model import ceiling, drawn_steps
            from distnum.distributed import connect, disconnect

            net = net_from_args(args, x.shape[1])
            owns_ray = connect(args.address)
            try:
                report["workers"] = bench_workers(x_train, t_train, args.workers, args.steps, net,
                                                  args.seed, args.h, args.batch_size)  # fmt: skip
            finally:
                disconnect(owns_ray)
            steps = drawn_steps(x_train, t_train, args.seed, args.steps, args.batch_size)
            allowed = ceiling(net.layout, net.flat_params, *steps, args.workers, args.h)
            for row in report["workers"]:
                row["ceiling"] = allowed[row["workers"]]
                row["of_ceiling"] = row["speedup"] / row["ceiling"]
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
            f"{report['workers'][0]['architecture']}, batch {args.batch_size}):"
        )
        print(format_worker_rows(report["workers"]))
    return 0


def json_alone_on_stdout(json_wanted: bool) -> contextlib.AbstractContextManager:
    """With --json, what else is printed meanwhile goes to stderr: Ray prints its raylets'
    warnings (such as "N PYTHON worker processes have been started") to stdout."""
    return contextlib.redirect_stdout(sys.stderr) if json_wanted else contextlib.nullcontext()


def run_model(args: argparse.Namespace, x_train: np.ndarray, t_train: np.ndarray) -> int:
    """distnum bench --model: the cost model measured, its predictions, and their plot."""
    from distnum.cost_model import (
        OVERHEAD_WORKERS,
        format_model,
        measure,
        plot_model,
        project_hosts,
    )
    from distnum.distributed import connect, disconnect
    from distnum.plot import save_figure

    with json_alone_on_stdout(args.json):
        owns_ray = connect(args.address)
        try:
            models = [measure(x_train, t_train, hidden, args.seed, args.h, args.steps,
                              args.batch_size, args.workers or OVERHEAD_WORKERS)
                      for hidden in args.hidden_sizes or [50, 200, 1000]]  # fmt: skip
        finally:
            disconnect(owns_ray)
    project_hosts(models)
    path = save_figure(plot_model(models), args.plot)
    if args.json:
        print(json.dumps({"model": models, "plot": str(path)}, indent=2))
        return 0
    print(f"bench --model: {args.steps} timed steps per point, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(format_model(models))
    print(f"plot: {path}")
    return 0


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


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
    if summary["steps_run"] == 0:
        return 0
    where = (
        "in this process"
        if summary["local"]
        else f"{summary['workers']} workers on {plural(len(summary['actors_per_node']), 'node')}"
    )
    resumed = (f", resumed from step {summary['resumed_from_step']}"
               if summary["resumed_from_step"] is not None else "")  # fmt: skip
    print(
        f"done: {summary['steps_run']} steps at {summary['steps_per_s']:.1f} steps/s "
        f"({summary['loop_s']:.1f} s of steps, {summary['wall_s']:.1f} s wall in all{resumed}; "
        f"{where}, engine {summary['engine']}), loss {summary['final_loss']:#.4g}, "
        f"train_acc {summary['train_acc']:.4f}, test_acc {summary['test_acc']:.4f}; outputs in "
        f"{summary['out']}"
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
    from distnum.engines import ENGINES
    from distnum.optimizers import OPTIMIZERS
    from distnum.training import DEFAULTS

    parser = OneLineParser(
        prog="distnum",
        description="Exact central-difference gradients: the chapter-4 network, chapter 6's "
        "deeper ones.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gradcheck = commands.add_parser("gradcheck", help="fast vs full engine vs backprop",
                                    formatter_class=HelpFormatter)  # fmt: skip
    add_batch_options(gradcheck)
    gradcheck.add_argument(
        "--full-sample",
        type=positive_int,
        default=2000,
        help="W1 coordinates the full engine checks (and every other parameter)",
    )
    gradcheck.add_argument("--truth-sample", type=whole_number(0), default=10, metavar="N",
                           help="coordinates of each array also evaluated to 50 digits (the "
                           "truth column; 0: none)")  # fmt: skip
    gradcheck.add_argument("--truth-tol", type=float, default=1e-15,
                           help="the largest |fast - truth| that passes")  # fmt: skip
    gradcheck.add_argument("--abs-tol", type=float, default=1e-9,
                           help="the largest |fast - full| that passes")  # fmt: skip
    gradcheck.add_argument("--rel-tol", type=float, default=1e-6,
                           help="the largest max|a - backprop| / max|backprop| of fast and of "
                           "full that passes")  # fmt: skip
    gradcheck.set_defaults(run=run_gradcheck)

    train = commands.add_parser("train", help="the notebook's MNIST training, over Ray",
                                formatter_class=HelpFormatter)  # fmt: skip
    resumed = "; on --resume, the run's own"
    train.add_argument("--iters", type=positive_int,
                       help=f"SGD steps in all (default {DEFAULTS['iters']}{resumed}; a larger "
                       "one extends a resumed run)")  # fmt: skip
    for name, kind, text in (
        ("batch-size", positive_int, "images per minibatch"),
        ("lr", float, "learning rate"),
        ("h", float, "the nudge of the central differences"),
        ("seed", whole_number(0), "seeds the initial weights and the minibatches"),
    ):
        default = DEFAULTS[name.replace("-", "_")]
        if name == "lr":
            default = "the optimizer's: sgd 0.1 (the chapter's), adam 0.001, the others 0.01"
        train.add_argument(f"--{name}", type=kind, help=f"{text} (default {default}{resumed})")
    add_architecture_options(train, None, resumed)
    train.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        help=f"how each gradient updates the parameters, as in chapter 6 (default sgd{resumed})",
    )
    train.add_argument(
        "--engine",
        choices=list(ENGINES),
        help="how each nudged loss is evaluated: fast, or full (the book's literal algorithm); "
        "backprop computes no nudges, the analytic gradient, for a reference run to compare "
        f"with (default fast{resumed})",
    )
    train.add_argument(
        "--workers",
        type=positive_int,
        help="worker actors (default: the CPUs Ray reports; more share them)",
    )
    train.add_argument("--data-dir", help="folder with the MNIST IDX files (default: "
                       "DISTNUM_DATA, then the cache, then a download)")  # fmt: skip
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
                       "at the end and on a stop)")  # fmt: skip
    train.add_argument("--resume", metavar="OUT",
                       help="go on with the run in OUT from its newest valid checkpoint, to "
                       "its own --iters or a larger one given")  # fmt: skip
    train.add_argument("--overwrite", action="store_true",
                       help="remove the run already in --out (its outputs and checkpoints) "
                       "and start again")  # fmt: skip
    train.add_argument("--max-worker-restarts", type=whole_number(0), default=3, metavar="N",
                       help="worker actors that die are replaced and their step redone, up "
                       "to N times in a run")  # fmt: skip
    train.set_defaults(run=run_train)

    bench = commands.add_parser("bench", help="seconds per gradient: full, fast, backprop",
                                formatter_class=HelpFormatter)  # fmt: skip
    add_batch_options(bench)
    bench.add_argument(
        "--hidden-sizes",
        type=positive_int,
        nargs="+",
        metavar="H",
        help="a row for each: nets of one hidden layer of H units, e.g. 50 100 200 (in place "
        "of --hidden)",
    )
    bench.add_argument(
        "--full-sample",
        type=positive_int,
        default=400,
        help="coordinates the full engine is timed on",
    )
    bench.add_argument("--repeat", type=positive_int, default=20,
                       help="timed calls of each engine; their median counts")  # fmt: skip
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
    bench.add_argument("--model", action="store_true",
                       help="measure the cost model of a step and plot it, for nets of one "
                       "sigmoid hidden layer: --hidden-sizes (default 50 200 1000), "
                       "--workers (default 1 2 4 8 16; 1, 2 and the cores always), --steps "
                       "per point")  # fmt: skip
    bench.add_argument("--plot", default="cost_model.png", metavar="FILE",
                       help="where --model writes its plot")  # fmt: skip
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.set_defaults(run=run_bench)
    plot = commands.add_parser("plot", help="loss and accuracy curves of a run, as a PNG",
                               formatter_class=HelpFormatter)  # fmt: skip
    plot.add_argument("run_dir", metavar="OUT", help="the --out folder of a distnum train run")
    plot.add_argument("-o", "--output", default="curves.png",
                      help="the image file; its extension picks the format (.png when it has "
                      "none; .pdf, .svg, ... as matplotlib writes them)")  # fmt: skip
    plot.set_defaults(run=run_plot)
    return parser


def run(argv: list[str] | None = None) -> int:
    """The command's exit status: 0 done, 1 the run failed (its last checkpoint kept), 2 bad
    input (nothing started), 130 stopped by Ctrl-C or SIGTERM (a checkpoint written)."""
    # the handlers go first, before the imports that take seconds: from here on a signal
    # stops a training run at a step boundary, and a signal after the run has written its
    # outputs (its own handlers gone) is too late to stop it and must not kill the process
    with StopRequests() as early:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit:  # --help, or a usage error already printed
            return exit.code if isinstance(exit.code, int) else 2
        if args.command == "train":
            return outcome(args)
        if early.signal_name:
            print(f"distnum: stopped by {early.signal_name}", file=sys.stderr)
            return 130
    return outcome(args)  # the other commands stop at Ctrl-C at once


def outcome(args: argparse.Namespace) -> int:
    """args.run(args)'s exit status, each way it can end as one line on stderr."""
    from distnum.checkpoint import CheckpointError
    from distnum.data import DataError
    from distnum.options import command_line
    from distnum.run_folder import OutputError, RunFolderError
    from distnum.training import ConfigError, Diverged, Interrupted

    # messages name options as flags while the command runs, and only then: run() can be
    # called from Python too
    token = command_line.set(True)
    try:
        return args.run(args)
    except (ConfigError, RunFolderError, CheckpointError, DataError, ConnectionError) as error:
        print(f"distnum: error: {error}", file=sys.stderr)
        return 2
    except (Diverged, OutputError) as error:
        print(f"distnum: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        from distnum.distributed import RayUnavailable, WorkerFailed  # imports Ray

        if isinstance(error, (WorkerFailed, RayUnavailable)):
            print(f"distnum: error: {error}", file=sys.stderr)
        else:  # a fault of distnum's own: the whole story, for the bug report
            traceback.print_exc()
        return 1
    except Interrupted as interrupted:
        print(f"distnum: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("distnum: interrupted", file=sys.stderr)
        return 130
    finally:
        command_line.reset(token)


def main(argv: list[str] | None = None) -> None:
    """The distnum command: runs, then ends the process with run()'s status. By then every
    file is closed and Ray shut down; ending here skips the interpreter's own exit, which
    after a compiled graph has lost an actor can crash in Ray's threads (seen as SIGSEGV
    after the run's last line) and would hide the status."""
    status = run(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
