"""GradVac (Wang, Tsvetkov, Firat & Cao, ICLR 2021): gradient vaccine,
written on the Gram matrix."""

from typing import Literal

import keras

from keras_mgda import numerics as nx
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput

__all__ = ["GradVac", "random_orders", "vaccine"]


@keras.saving.register_keras_serializable(package="keras_mgda")
class GradVac(GradientWeighting):
    """Gradient vaccine: pairwise gradient similarity goals.

    Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models",
    ICLR 2021 (Algorithm 1). Each task gradient g_i^PC (starting at g_i)
    visits the other tasks j in a random order; where its cosine with g_j,
    phi_ij, is below the goal phi_hat_ij, a multiple of g_j is added so that
    the cosine becomes the goal:

        g_i^PC += ||g_i^PC|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                  / (||g_j|| sqrt(1 - phi_hat^2)) g_j,

    and the goal follows an exponential moving average of the observed
    cosines, phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij (for every
    visited pair, corrected or not, as in the paper, torchjd and LibMTL;
    LibMTL's versions before its "fix a bug in GradVac" updated only the
    corrected pairs). The shared weights follow sum_i g_i^PC. As in torchjd,
    every g_i^PC is a combination of the task gradients, so the method runs
    on the Gram matrix, and the weight of task k is the sum over i of the
    coefficient of g_k in g_i^PC. With goals 0 (the start) it is PCGrad's
    projection; without conflicts every weight is 1.

    The goals phi_hat (T x T, starting at 0) are the weighting's state,
    saved with the model; the orders are drawn every step from a
    `keras.random.SeedGenerator` the model tracks (an independent order for
    each i, as torchjd's `torch.randperm` per task and LibMTL's
    `random.shuffle`). The whole gradient is one group (the paper's and
    LibMTL's per-layer grouping is not offered). Where sqrt(1 - phi_hat^2)
    is 0 (a goal of exactly +-1) no correction is made; cosines involving
    a zero gradient count as 0. Task heads keep their plain gradients
    (`head_update="full"`), as in the paper.

    Degenerate input (cap): a correction lengthens g_i^PC by
    sqrt(1 - phi^2) / sqrt(1 - phi_hat^2), without bound as a goal nears 1
    (after a run of aligned gradients, goals of 1 - 1e-7 and then
    orthogonal ones gave weights of 1025, the update 1450 times the
    gradients). So each g_i^PC is scaled down to at most `growth_cap`
    (10) times ||g_i|| (a goal up to 0.995 against orthogonal gradients is
    untouched), and the update is at most `growth_cap` sum_i ||g_i||. The
    paper and LibMTL have no such bound (LibMTL adds 1e-8 to the
    divisor).

    Args:
        beta: the EMA rate of the goals, in [0, 1] (default 0.5, LibMTL's
            and torchjd's default).
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as in the paper).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task weight times their gradient).
        seed: int or None, seed of the random orders.
        growth_cap: the largest ||g_i^PC|| / ||g_i|| (see above), > 0; None
            for no cap.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights, the coefficients of the task
        gradients in sum_i g_i^PC.

    Example:

    ```python
    weighting = keras_mgda.weighting.GradVac(beta=0.5, seed=0)
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    def __init__(
        self,
        beta: float = 0.5,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        seed: int | None = None,
        growth_cap: float | None = 10.0,
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        if growth_cap is not None and not 0 < growth_cap < float("inf"):
            raise ValueError(f"growth_cap must be finite and > 0, or None; got {growth_cap!r}.")
        self.growth_cap = None if growth_cap is None else float(growth_cap)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}.")
        self.beta = float(beta)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.goals = self.add_state("goals", (num_tasks, num_tasks))

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        orders = random_orders(gram.num_tasks, self.seed_generator, ops=ops)
        goals = ops.cast(self.goals.value, gram.dtype)
        weights, goals = vaccine(gram.unit, goals, orders, self.beta, growth_cap=self.growth_cap, ops=ops)
        # A non-finite M leaves the goals as they were (and gives NaN weights).
        self.goals.assign(ops.cast(ops.where(gram.finite, goals, self.goals.value), "float32"))
        return gram.finish(weights)

    def get_config(self):
        config = super().get_config()
        config.update({"beta": self.beta, "seed": self.seed, "growth_cap": self.growth_cap})
        return config


def random_orders(num_tasks, seed, *, ops=keras.ops):
    """(T, T - 1) int32: row i, the other tasks in a random order.

    Args:
        num_tasks: T (static).
        seed: a `keras.random.SeedGenerator` (or an int).
        ops: the namespace of array functions.

    Returns:
        Row i is a uniformly random permutation of {0..T-1} without i.
    """
    draws = keras.random.uniform((num_tasks, num_tasks), seed=seed)
    draws = ops.where(ops.eye(num_tasks) > 0, 2.0, draws)  # i itself last
    return ops.cast(ops.argsort(draws, axis=-1)[:, : num_tasks - 1], "int32")


def vaccine(gram, goals, orders, beta, *, growth_cap=None, ops=keras.ops):
    """GradVac's coefficients and updated goals for given task orders.

    All tasks i are corrected at once: step s visits task orders[i, s] for
    every i (the corrections of different i are independent).

    Args:
        gram: (T, T) Gram matrix M.
        goals: (T, T) goals phi_hat, in M's dtype.
        orders: (T, T - 1) int32, as `random_orders` returns.
        beta: the EMA rate (a Python float).
        growth_cap: None, or the largest ||g_i^PC|| / ||g_i||: longer
            corrected gradients are scaled down to it.
        ops: the namespace of array functions.

    Returns:
        `(weights, goals)`: (T,) weights (sum over i of the coefficients of
        g_i^PC) and the (T, T) updated goals.
    """
    num_tasks = gram.shape[-1]
    dtype = nx.float_dtype(gram)
    norms = ops.sqrt(nx.maximum(ops.diagonal(gram), nx.const(0.0, gram, ops=ops), ops=ops))
    zero = nx.const(0.0, gram, ops=ops)

    def safe_divide(x, y):
        return ops.where(y > 0, x / ops.where(y > 0, y, 1.0), zero)

    def body(step, state):
        coefficients, products, goals = state  # products[i, k] = g_i^PC . g_k
        picked = nx.one_hot(ops.take(orders, step, axis=1), num_tasks, dtype, ops=ops)
        norm_i = ops.sqrt(nx.maximum(ops.sum(products * coefficients, axis=-1), zero, ops=ops))
        norm_j = ops.sum(picked * norms[None, :], axis=-1)
        phi = safe_divide(ops.sum(products * picked, axis=-1), norm_i * norm_j)
        goal = ops.sum(goals * picked, axis=-1)
        root_phi = ops.sqrt(nx.maximum(1.0 - phi * phi, zero, ops=ops))
        root_goal = ops.sqrt(nx.maximum(1.0 - goal * goal, zero, ops=ops))
        step_size = safe_divide(norm_i * (goal * root_phi - phi * root_goal), norm_j * root_goal)
        step_size = ops.where(phi < goal, step_size, zero)
        coefficients = coefficients + step_size[:, None] * picked
        products = products + step_size[:, None] * nx.matvec(gram[None, :, :], picked, ops=ops)
        goals = goals + picked * (beta * (phi - goal))[:, None]
        return coefficients, products, goals

    coefficients = ops.eye(num_tasks, dtype=dtype)
    if num_tasks == 1:  # no other task (and JAX traces the body even for 0 rounds)
        return ops.sum(coefficients, axis=0), goals
    state = (coefficients, gram, goals)
    coefficients, products, goals = ops.fori_loop(0, num_tasks - 1, body, state)
    if growth_cap is not None:
        lengths = ops.sqrt(nx.maximum(ops.sum(products * coefficients, axis=-1), zero, ops=ops))
        limit = growth_cap * norms
        shrink = ops.where(lengths > limit, safe_divide(limit, lengths), nx.const(1.0, gram, ops=ops))
        coefficients = coefficients * shrink[:, None]
    return ops.sum(coefficients, axis=0), goals
