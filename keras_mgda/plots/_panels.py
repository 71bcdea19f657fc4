"""Which methods the accuracy profile draws together: the paper's
comparison, then the weightings of `keras_mgda.weighting` by kind."""

from collections.abc import Mapping

# Ten methods, ten colours: more are split into panels.
ONE_PANEL_MAX = 10

# The methods of Sener & Koltun's Figure 3, drawn together.
PAPER_METHODS = ("uniform", "uncertainty", "gradnorm", "mgda_ub", "mgda")
PANEL_ORDER = ("Sener & Koltun's comparison", "loss-based methods", "Gram-matrix methods",
               "gradient aggregators", "other")


def _family(method):
    """The panel of a method: the paper's, or its weighting's kind."""
    if method in PAPER_METHODS:
        return PANEL_ORDER[0]
    from keras_mgda import weighting  # late: the plots need no weighting otherwise

    cls = weighting.by_name().get(method)
    if cls is None:
        return "other"
    if getattr(cls, "aggregates_gradients", False):
        return "gradient aggregators"
    # A wrapper (CR-MOGM) decides per instance; by default it wraps MGDA.
    needs_gram = cls.requires_gram if isinstance(cls.requires_gram, bool) else True
    return "Gram-matrix methods" if needs_gram else "loss-based methods"


def method_panels(methods, groups):
    """`{panel title: [methods]}` in drawing order, empty panels left out;
    `{}` for a single panel (see `accuracy_profile`'s `groups`)."""
    if groups is None:
        return {}
    if groups == "family":
        if len(methods) <= ONE_PANEL_MAX:
            return {}  # ten methods tell apart in one panel
        panels = {name: [m for m in methods if _family(m) == name] for name in PANEL_ORDER}
    elif isinstance(groups, Mapping):
        listed = {m for names in groups.values() for m in names}
        panels = {name: [m for m in names if m in methods] for name, names in groups.items()}
        panels["other"] = [m for m in methods if m not in listed]
    else:
        raise ValueError(f"groups must be 'family', a mapping or None; received {groups!r}.")
    return {name: found for name, found in panels.items() if found}
