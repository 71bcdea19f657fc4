"""How far every weighting's update reaches on the degenerate problems,
beside its documented bound: the table of docs/guide/reliability.md.

Each method runs three steps (fresh state) on each degenerate family of
`keras_mgda.weighting._bounds.families` (one task, a zero gradient, every
gradient zero, a zero loss, identical, opposite, one task 1e8 larger,
rank-deficient, tiny gradients), for several random draws of the
gradients, and the worst shared and head updates are reported in their
bound's unit, with the largest fraction of the bound used.

Usage:
    KERAS_BACKEND=torch python benchmarks/degenerate_bounds.py --seeds 10 > table.md
"""

import argparse

from keras_mgda.weighting import _bounds


def measure(name, seeds):
    """The worst shared and head reach of `name` and the largest fraction
    of its bound, over the families and seeds; and whether every weight
    stayed finite."""
    shared = heads = fraction = 0.0
    finite = True
    for seed in range(seeds):
        for g, losses in _bounds.families(seed).values():
            reach = _bounds.reach(name, g, losses)
            if g.shape[0] == 1:  # trained as plain Keras: not the method's
                continue
            shared, heads = max(shared, reach.shared), max(heads, reach.heads)
            fraction = max(fraction, reach.shared / reach.shared_bound, reach.heads / reach.heads_bound)
            finite = finite and reach.finite
    return shared, heads, fraction, finite


def row(name, seeds):
    bound = _bounds.BOUNDS[name]
    shared, heads, fraction, finite = measure(name, seeds)
    cells = [
        f"`{name}`",
        bound.policy,
        f"{bound.shared[2]} x {_bounds.UNITS[bound.shared[0]]}",
        f"{bound.heads[2]} x {_bounds.UNITS[bound.heads[0]]}",
        f"{shared:.3g}",
        f"{heads:.3g}",
        f"{fraction:.2f}" + ("" if finite else " (non-finite!)"),
    ]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="random draws of each family")
    parser.add_argument("--method", nargs="*", help="methods (default: all)")
    args = parser.parse_args()
    header = ["method", "degenerate-input policy", "shared bound", "head bound",
              "measured shared", "measured heads", "largest fraction of the bound"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in args.method or sorted(_bounds.BOUNDS):
        print(row(name, args.seeds))


if __name__ == "__main__":
    main()
