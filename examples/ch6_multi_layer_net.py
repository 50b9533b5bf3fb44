"""6.1-6.2 MultiLayerNet: 784-100-100-10 ReLU with He's initial weights and Adam, trained by
central differences over Ray, and the same run by backprop: the test accuracy of each.

    python examples/ch6_multi_layer_net.py                     # 1,500 steps, about 3 min
    python examples/ch6_multi_layer_net.py --iters 100 --hidden 20 20 --local

Both runs start from the same weights and draw the same minibatches: they differ in their
gradients alone (`--engine fast` against `--engine backprop`).
"""

import argparse

import distnum

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--iters", type=int, default=1500)
parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100])
parser.add_argument("--workers", type=int, help="default: the CPUs Ray reports")
parser.add_argument("--local", action="store_true", help="the numerical run without Ray")
parser.add_argument("--out", default="runs/ch6", help="the two runs go in OUT/fast, OUT/backprop")
args = parser.parse_args()

book = {"iters": args.iters, "hidden": args.hidden, "activation": "relu",
        "weight_init_std": "relu", "optimizer": "adam", "lr": 0.001, "batch_size": 100,
        "seed": 0, "overwrite": True, "quiet": True}  # fmt: skip
runs = {
    "fast": distnum.train(engine="fast", workers=args.workers, local=args.local,
                          out=f"{args.out}/fast", **book),
    "backprop": distnum.train(engine="backprop", local=True, out=f"{args.out}/backprop", **book),
}  # fmt: skip
print(f"{runs['fast']['architecture']}, Adam lr 0.001, batch 100, {args.iters} steps")
print(f"{'gradient':<9} {'loss':>8} {'train_acc':>10} {'test_acc':>9} {'steps/s':>8}")
for engine, summary in runs.items():
    print(f"{engine:<9} {summary['final_loss']:>8.4f} {summary['train_acc']:>10.4f} "
          f"{summary['test_acc']:>9.4f} {summary['steps_per_s']:>8.1f}")  # fmt: skip
gap = runs["fast"]["test_acc"] - runs["backprop"]["test_acc"]
print(f"test accuracy, central differences minus backprop: {gap:+.4f}")
