"""distnum gradcheck: the fast engine against the full one and against backprop, on a real
batch, array by array."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from distnum.engines import FastEngine, FullEngine
from distnum.models import MultiLayerNet, ParamLayout, forward


def sample_indices(net: MultiLayerNet, w1_sample: int, rng: np.random.Generator) -> np.ndarray:
    """A random sample of W1's flat indices plus every other parameter's index, sorted."""
    w1 = net.layout.slices["W1"]
    chosen = rng.choice(w1.stop, size=min(w1_sample, w1.stop), replace=False)
    return np.sort(np.concatenate([chosen, np.arange(w1.stop, net.layout.size)]))


def train_with_backprop(
    net: MultiLayerNet, x: np.ndarray, t: np.ndarray, steps: int, rng: np.random.Generator,
    lr: float = 0.1, batch_size: int = 100,
) -> None:  # fmt: skip
    """A few SGD steps with backprop, to check gradients at weights that have learnt."""
    for _ in range(steps):
        mask = rng.choice(len(x), batch_size)
        grads = net.gradient(x[mask], t[mask])
        for name in net.layout.names:
            net.params[name] -= lr * grads[name]


def near_kinks(net: MultiLayerNet, x: np.ndarray, h: float) -> np.ndarray:
    """(P,) bool: for each flat index, whether its nudge by +-h may carry a ReLU unit's
    pre-activation to or across its kink on some sample of the batch x (N, I). There a
    central difference measures no derivative, so it is not compared with backprop.

    A bound, never a miss: a nudge of W_l[i, j] moves a_l[n, j] by at most h |z_{l-1}[n, i]|
    (b_l[j]: by h); a move of at most d in a unit moves unit q of a layer above by at most
    d G[j, q], G the product of the absolute weights between them (ReLU is 1-Lipschitz).
    The moves are taken 1e-6 larger, for the rounding of the forward pass and of the nudge.
    The output layer's nudges reach no kink (the softmax has none)."""
    layout, near = net.layout, np.zeros(net.layout.size, dtype=bool)
    if layout.activation != "relu":
        return near
    activations = forward(layout, net.params, x)
    for layer in range(1, layout.depth):  # W_layer and b_layer move hidden layer `layer`
        margin = np.abs(activations.pre[layer - 1])  # (N, J): the least move reaching a kink
        gain = None  # (J, Q): the product of the absolute weights from layer to above
        for above in range(layer + 1, layout.depth):
            weights = np.abs(net.params[f"W{above}"])
            gain = weights if gain is None else gain @ weights
            distance = np.abs(activations.pre[above - 1])  # (N, Q)
            for n in range(len(x)):  # one sample at a time: (J, Q) each, not (N, J, Q)
                # a unit no path reaches (gain 0) is never reached, even at its kink
                reach = np.divide(distance[n], gain, out=np.full(gain.shape, np.inf),
                                  where=gain > 0)  # fmt: skip
                margin[n] = np.minimum(margin[n], reach.min(axis=1))
        slack = 1 + 1e-6
        moved = slack * h * np.abs(activations.inputs[layer - 1])  # (N, I): the most a_l moves
        weight_reaches = np.zeros((moved.shape[1], margin.shape[1]), dtype=bool)  # (I, J)
        for n in range(len(x)):
            weight_reaches |= (moved[n, :, None] >= margin[n]) & (moved[n, :, None] > 0)
        near[layout.slices[f"W{layer}"]] = weight_reaches.ravel()
        near[layout.slices[f"b{layer}"]] = (slack * h >= margin).any(axis=0)
    return near


def compare(
    net: MultiLayerNet, x: np.ndarray, labels: np.ndarray, h: float, w1_sample: int,
    rng: np.random.Generator, truth_sample: int = 0,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per array: max |fast - full| on the sampled indices, the max relative errors
    (max |a - b| / max |b|) of fast and of full against backprop where no kink lies within
    a nudge (near_kinks; how many do is "near_kink"), and with truth_sample the max
    |fast - truth| and |full - truth| on that many of the sampled indices, the truth
    evaluated to 50 digits (exact_central_differences), leaving out the nudges that carry
    a unit above the first hidden layer across its kink (Truth; how many: "truth_at_kink")."""
    layout = net.layout
    fast = FastEngine(layout, np.arange(layout.size))(net.flat_params, x, labels, h)
    indices = sample_indices(net, w1_sample, rng)
    full = FullEngine(layout, indices)(net.flat_params, x, labels, h)
    backprop = layout.flatten(net.gradient(x, labels))
    near = near_kinks(net, x, h)
    report = {}
    for name, part in layout.slices.items():
        inside = (indices >= part.start) & (indices < part.stop)
        sampled = indices[inside]
        scale = np.max(np.abs(backprop[part]))
        compared, sampled_compared = ~near[part], ~near[sampled]
        report[name] = {
            "checked_full": int(sampled.size),
            "fast_vs_full_abs": float(np.max(np.abs(fast[sampled] - full[inside]))),
            "near_kink": int(near[part].sum()),
            "fast_vs_backprop_rel": relative_error(fast[part][compared],
                                                   backprop[part][compared], scale),
            "full_vs_backprop_rel": relative_error(full[inside][sampled_compared],
                                                   backprop[sampled][sampled_compared], scale),
        }  # fmt: skip
        if truth_sample:
            chosen = np.sort(rng.choice(np.flatnonzero(inside), min(truth_sample, sampled.size),
                                        replace=False))  # fmt: skip
            truth, at_kink = exact_central_differences(layout, net.flat_params, x, labels, h,
                                                       indices[chosen])  # fmt: skip
            report[name].update({
                "checked_truth": int(chosen.size),
                "truth_at_kink": int(at_kink.sum()),
                "fast_vs_truth_abs": float(np.max(np.abs(fast[indices[chosen]] - truth)[~at_kink],
                                                  initial=0.0)),
                "full_vs_truth_abs": float(np.max(np.abs(full[chosen] - truth)[~at_kink],
                                                  initial=0.0)),
            })  # fmt: skip
    return report


def relative_error(values: np.ndarray, reference: np.ndarray, scale: float) -> float:
    """max |values - reference| / scale; 0 for no values; with a zero scale (an array whose
    gradient is 0) inf, or NaN where values are 0 too, which passes any tolerance."""
    if not values.size:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.max(np.abs(values - reference)) / scale)


class Truth(NamedTuple):
    """exact_central_differences' answer: the differences (R,), and for each whether its
    nudge moves a ReLU unit above the first hidden layer across its kink on some sample (R,)
    bool. There the nudged loss depends on the unit's pre-activation itself, which a float64
    forward pass knows only to about 1e-16 (absolute): the float64 engines may then be that
    far divided by 2h (and the batch size) from the truth. (In the first hidden layer the
    fast engine recomputes such pre-activations exact: engines/unnudged.exact_near_kinks.)"""

    differences: np.ndarray
    crosses_kink: np.ndarray


def exact_central_differences(
    layout: ParamLayout, flat: np.ndarray, x: np.ndarray, labels: np.ndarray, h: float,
    indices: np.ndarray, digits: int = 50,
) -> Truth:  # fmt: skip
    """The central differences (L(theta + h e_k) - L(theta - h e_k)) / 2h at the flat
    indices, each nudged loss evaluated with `digits` significant digits (mpmath) and the
    nudge exactly h: the truth the float64 engines are measured against. x (B, I) and the
    class indices labels (B,) as the engines take them (checked_batch).

    Each sample's forward pass is computed once, exactly (mpmath.fdot), then for each index
    only the samples it moves, from the nudged layer up."""
    import mpmath

    mp = mpmath.mp
    depth, sizes = layout.depth, layout.sizes
    with mpmath.workdps(digits):
        weights = [[[mp.mpf(float(w)) for w in row] for row in W.tolist()] for W in
                   (layout.views(flat)[f"W{layer}"] for layer in range(1, depth + 1))]  # fmt: skip
        biases = [[mp.mpf(float(b)) for b in layout.views(flat)[f"b{layer}"]]
                  for layer in range(1, depth + 1)]  # fmt: skip
        relu = layout.activation == "relu"

        def activate(a):
            return (a if a > 0 else mp.zero) if relu else 1 / (1 + mp.exp(-a))

        forward = {}  # sample: (z_0..z_L, a_1..a_{L+1}), each a list of mpf

        def forward_pass(n: int):
            if n not in forward:
                inputs, pre = [[mp.mpf(float(v)) for v in x[n]]], []
                for layer in range(depth):
                    z, W = inputs[-1], weights[layer]
                    used = [i for i, v in enumerate(z) if v != 0]
                    pre.append([mpmath.fdot([(z[i], W[i][j]) for i in used]) + biases[layer][j]
                                for j in range(sizes[layer + 1])])  # fmt: skip
                    if layer < depth - 1:
                        inputs.append([activate(a) for a in pre[-1]])
                forward[n] = (inputs, pre)
            return forward[n]

        def loss(logits, label):
            return mpmath.log(mpmath.fsum(mp.exp(a) for a in logits)) - logits[label]

        def nudged_loss(n: int, layer: int, unit: int, delta):
            """Sample n's loss when a_{layer+1}[unit] (0-based layer) moves by delta."""
            inputs, pre = forward_pass(n)
            moved = {unit: delta}  # pre-activation changes of this layer, by unit
            for k in range(layer, depth - 1):
                changes = {}
                for j, d in moved.items():
                    change = activate(pre[k][j] + d) - inputs[k + 1][j]
                    if change != 0:
                        changes[j] = change
                    # (the first layer's crossings the fast engine takes exactly: exact_near_kinks)
                    crossed[0] |= relu and k > 0 and (pre[k][j] > 0) != (pre[k][j] + d > 0)
                W = weights[k + 1]
                moved = {p: mpmath.fsum(c * W[j][p] for j, c in changes.items())
                         for p in range(sizes[k + 2])}  # fmt: skip
            logits = list(pre[depth - 1])
            for c, d in moved.items():
                logits[c] += d
            return loss(logits, labels[n])

        exact_h = mp.mpf(h)
        out = np.empty(len(indices))
        crosses = np.zeros(len(indices), dtype=bool)
        crossed = [False]
        slices = layout.slices
        for position, index in enumerate(np.asarray(indices, dtype=np.int64)):
            name = next(name for name, part in slices.items() if part.start <= index < part.stop)
            layer, offset = int(name[1:]) - 1, int(index - slices[name].start)
            row, unit = divmod(offset, sizes[layer + 1]) if name[0] == "W" else (None, offset)
            total = mp.zero
            crossed[0] = False
            for n in range(x.shape[0]):
                value = mp.one if row is None else forward_pass(n)[0][layer][row]
                if value != 0:
                    total += (nudged_loss(n, layer, unit, exact_h * value)
                              - nudged_loss(n, layer, unit, -exact_h * value))  # fmt: skip
            difference = total / (2 * exact_h * x.shape[0])
            if name[0] == "W" and layout.weight_decay:  # 0.5 lambda ((w+h)**2 - (w-h)**2) / 2h
                difference += mp.mpf(layout.weight_decay) * weights[layer][row][unit]
            out[position] = float(difference)
            crosses[position] = crossed[0]
    return Truth(out, crosses)
