"""MINRES (Paige & Saunders, 1975) in `keras.ops`, for a symmetric linear
operator on lists of tensors.

Exploring the Pareto set solves (H + damping I) v = J^T beta, with H the
Hessian of sum_i alpha_i f_i: symmetric, not necessarily positive definite
away from a minimum, and known only through Hessian-vector products. MINRES
is the Krylov method for symmetric indefinite systems; it needs one
operator application and a few inner products per iteration and keeps five
vectors. Written with `keras.ops` and a capped `ops.while_loop` with fixed
shapes, it runs where the model runs (an accelerator included) and traces
into `jax.jit` or `tf.function` when the operator does: no host round trip.
"""

import keras
from keras import ops

__all__ = ["minres"]


def _dot(a, b):
    return sum(ops.sum(x * y) for x, y in zip(a, b, strict=True))


def _combine(*terms):
    """sum_k c_k * a_k over lists of tensors; `terms` are (c, a) pairs."""
    out = None
    for coefficient, vectors in terms:
        scaled = [coefficient * x for x in vectors]
        out = scaled if out is None else [o + s for o, s in zip(out, scaled, strict=True)]
    return out


def _safe_divide(a, b):
    return ops.where(b != 0, a / ops.where(b != 0, b, 1), 0)


def _rotation(state, alfa, beta):
    """The Givens rotation step of MINRES on the new Lanczos column."""
    cs, sn, dbar = state["cs"], state["sn"], state["dbar"]
    delta = cs * dbar + sn * alfa
    gbar = sn * dbar - cs * alfa
    epsln = sn * beta
    dbar = -cs * beta
    gamma = ops.sqrt(gbar * gbar + beta * beta)
    gamma = ops.maximum(gamma, keras.config.epsilon() * 1e-10)
    return delta, epsln, dbar, gamma, gbar / gamma, beta / gamma


def _iteration(operator, damping, state):
    """One MINRES iteration (Paige & Saunders; no preconditioner)."""
    beta, oldb = state["beta"], state["oldb"]
    v = [y / beta for y in state["r2"]]
    y = _combine((1.0, operator(v)), (damping, v), (-_safe_divide(beta, oldb), state["r1"]))
    alfa = _dot(v, y)
    y = _combine((1.0, y), (-alfa / beta, state["r2"]))
    new_beta = ops.sqrt(_dot(y, y))
    delta, epsln, dbar, gamma, cs, sn = _rotation(state, alfa, new_beta)
    phi = cs * state["phibar"]
    w = _combine((1.0 / gamma, v), (-state["epsln"] / gamma, state["w2"]), (-delta / gamma, state["w"]))
    return {
        "itn": state["itn"] + 1,
        "x": _combine((1.0, state["x"]), (phi, w)),
        "r1": state["r2"],
        "r2": y,
        "w": w,
        "w2": state["w"],
        "beta": new_beta,
        "oldb": beta,
        "dbar": dbar,
        "epsln": epsln,
        "phibar": sn * state["phibar"],
        "cs": cs,
        "sn": sn,
    }


def minres(operator, b, *, damping=0.0, max_iters=50, tol=1e-5):
    """Solves (A + damping I) x = b for a symmetric operator A by MINRES.

    Args:
        operator: a function from a list of tensors to a list of tensors of
            the same shapes, linear and symmetric (e.g. a Hessian-vector
            product). It must be traceable by `ops.while_loop` on the backend
            (on JAX the loop body is traced once).
        b: the right-hand side, a list of tensors.
        damping: a scalar added to the operator's diagonal.
        max_iters: the most iterations (operator applications).
        tol: stop when the residual norm ||b - (A + damping I) x|| (MINRES's
            own estimate, exact in exact arithmetic) is at most `tol * ||b||`.

    Returns:
        `(x, iterations, residual)`: the solution as a list shaped like `b`
        (zeros when b = 0), the number of iterations run, and the estimated
        relative residual norm.

    Example:

    ```python
    a = keras.ops.convert_to_tensor([[2.0, 1.0], [1.0, -3.0]])
    x, iterations, residual = minres(lambda v: [a @ v[0]], [keras.ops.ones((2,))])
    ```
    """
    b = [ops.convert_to_tensor(t) for t in b]
    dtype = b[0].dtype
    beta1 = ops.sqrt(_dot(b, b))
    zero = ops.zeros((), dtype)
    zeros = [ops.zeros_like(t) for t in b]
    state = {
        "itn": ops.zeros((), "int32"), "x": zeros, "r1": b, "r2": b, "w": zeros, "w2": zeros,
        "beta": beta1, "oldb": zero, "dbar": zero, "epsln": zero, "phibar": beta1,
        "cs": -ops.ones((), dtype), "sn": zero,
    }
    keys = sorted(state)
    threshold = ops.cast(tol, dtype) * beta1

    # `beta > 0` also stops on an exact solution inside the Krylov space
    # (the next Lanczos vector would be 0 / 0).
    def cond(*values):
        s = dict(zip(keys, values))
        return (s["itn"] < max_iters) & (s["phibar"] > threshold) & (s["beta"] > 0)

    def body(*values):
        s = _iteration(operator, damping, dict(zip(keys, values)))
        return tuple(s[k] for k in keys)

    final = ops.while_loop(cond, body, tuple(state[k] for k in keys), maximum_iterations=max_iters)
    final = dict(zip(keys, final))
    return final["x"], final["itn"], _safe_divide(final["phibar"], beta1)
