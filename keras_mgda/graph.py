"""Finding the shared representation Z of a functional model, and splitting
the model at Z into an encoder (inputs -> Z) and heads (Z -> outputs).

Z is the immediate dominator of a virtual sink joined to every output, in the
tensor graph rooted at a virtual source joined to every input: the deepest
tensor that every path from an input to an output goes through. Every output
depends on Z and on nothing else from the inputs, so the heads can be run on
Z alone and the per-task gradients with respect to Z tell the whole story.
"""

from collections.abc import Sequence

import keras

from keras_mgda import _keras

__all__ = [
    "find_shared_representation",
    "head_groups",
    "output_heads",
    "resolve_shared",
    "split_at",
]

_SOURCE = "source"
_SINK = "sink"


def _producing_node(tensor):
    history = _keras.keras_history(tensor)
    if history is None:
        return None
    operation, node_index, _ = history
    return _keras.inbound_nodes(operation)[node_index]


def _tensor_predecessors(outputs):
    """Maps id(tensor) -> ids of the tensors its producing node reads.

    Returns (predecessors, tensors_by_id), covering every tensor that an
    output depends on. Input tensors have the virtual source as predecessor.
    """
    predecessors = {}
    tensors = {}
    stack = list(outputs)
    while stack:
        tensor = stack.pop()
        key = id(tensor)
        if key in tensors:
            continue
        tensors[key] = tensor
        node = _producing_node(tensor)
        if node is None or node.is_input or not node.input_tensors:
            predecessors[key] = [_SOURCE]
            continue
        parents = list(node.input_tensors)
        predecessors[key] = [id(p) for p in parents]
        stack.extend(parents)
    predecessors[_SINK] = [id(t) for t in outputs]
    return predecessors, tensors


def _topological_order(predecessors):
    """Orders nodes so that every node comes after all its predecessors."""
    order, state = [], {}
    for root in predecessors:
        if root in state:
            continue
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                state[node] = "done"
                order.append(node)
                continue
            if state.get(node) is not None:
                continue
            state[node] = "open"
            stack.append((node, True))
            for parent in predecessors.get(node, ()):
                if state.get(parent) is None:
                    stack.append((parent, False))
    return order


def find_shared_representation(
    inputs: Sequence[keras.KerasTensor], outputs: Sequence[keras.KerasTensor]
) -> keras.KerasTensor:
    """Finds the deepest tensor that every output depends on.

    Uses the Cooper-Harvey-Kennedy dominator intersection, which on a DAG
    needs one pass in topological order.

    Args:
        inputs: the functional model's input tensors (a flat list).
        outputs: the functional model's output tensors (a flat list).

    Returns:
        The `KerasTensor` Z such that every path from an input to an output
        goes through Z.

    Raises:
        ValueError: if no such tensor exists besides the inputs themselves,
            that is, the outputs share no layer.

    Example:

    >>> x = keras.Input((4,))
    >>> z = keras.layers.Dense(3)(x)
    >>> a, b = keras.layers.Dense(1)(z), keras.layers.Dense(1)(z)
    >>> find_shared_representation([x], [a, b]) is z
    True
    """
    predecessors, tensors = _tensor_predecessors(outputs)
    idom = {_SOURCE: _SOURCE}
    depth = {_SOURCE: 0}

    def intersect(a, b):
        while a != b:
            if depth[a] >= depth[b]:
                a = idom[a]
            else:
                b = idom[b]
        return a

    for node in _topological_order(predecessors):
        if node == _SOURCE:
            continue
        preds = predecessors[node]
        dominator = preds[0]
        for pred in preds[1:]:
            dominator = intersect(dominator, pred)
        idom[node] = dominator
        depth[node] = depth[dominator] + 1

    shared = idom[_SINK]
    input_ids = {id(t) for t in inputs}
    if shared == _SOURCE or shared in input_ids:
        raise ValueError(
            "keras_mgda could not find a shared representation: the model's "
            "outputs share no layer (every output can be reached from an "
            "input without passing through a common tensor). Multi-task "
            "training needs a shared trunk whose output feeds every head. "
            "Build the heads on a common tensor, or name it with "
            "`shared=<layer name>`."
        )
    return tensors[shared]


def resolve_shared(
    model: keras.Model, shared: str | keras.layers.Layer | keras.KerasTensor | None
) -> keras.KerasTensor:
    """Returns the tensor Z named by `shared`, or found automatically.

    Args:
        model: a functional `keras.Model`.
        shared: None (find it), a layer name, a `keras.layers.Layer` of the
            model, or a `KerasTensor` of the model's graph.

    Returns:
        The `KerasTensor` Z.
    """
    if shared is None:
        return find_shared_representation(model.inputs, model.outputs)
    if isinstance(shared, str):
        try:
            shared = model.get_layer(shared)
        except ValueError as error:
            raise ValueError(
                f"`shared={shared!r}` names no layer of the model. Pass the "
                "name of the layer whose output is the shared representation "
                f"(layers: {[layer.name for layer in model.layers]})."
            ) from error
    if isinstance(shared, keras.layers.Layer):
        calls = len(_keras.inbound_nodes(shared))
        if calls != 1:
            raise ValueError(
                f"Layer '{shared.name}' is called "
                f"{calls} times in the model, so its "
                "output is ambiguous. Name a layer that is called once."
            )
        shared = shared.output
    if isinstance(shared, (list, tuple)):
        raise ValueError(
            "The shared representation must be a single tensor; the named "
            "layer has several outputs."
        )
    return shared


def _operations_above(tensors, stop_id=None):
    """The operations that produce `tensors` and everything they read,
    going up no further than the tensor with id `stop_id`; and whether an
    input was reached on the way (then `stop_id` is not a cut)."""
    operations, seen, stack, reached_input = {}, set(), list(tensors), False
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen or id(tensor) == stop_id:
            continue
        seen.add(id(tensor))
        node = _producing_node(tensor)
        if node is None or node.is_input or not node.input_tensors:
            reached_input = True
            continue
        operations[id(node.operation)] = node.operation
        stack.extend(node.input_tensors)
    return operations, reached_input


def split_at(model: keras.Model, shared_tensor: keras.KerasTensor) -> tuple[keras.Model, keras.Model]:
    """Splits a functional model into encoder (inputs -> Z) and heads
    (Z -> outputs), sharing the model's layers and weights.

    Args:
        model: a functional `keras.Model`.
        shared_tensor: the `KerasTensor` Z, a cut of the graph.

    Returns:
        `(encoder, heads)`, two functional models.
    """
    outputs = _keras.outputs_struct(model)
    trunk, _ = _operations_above([shared_tensor])
    heads, not_a_cut = _operations_above(
        keras.tree.flatten(outputs), stop_id=id(shared_tensor)
    )
    on_both_sides = [op.name for key, op in trunk.items() if key in heads]
    if on_both_sides and not not_a_cut:
        raise ValueError(
            f"Layer(s) {on_both_sides} are called both before and after the "
            f"shared representation '{getattr(shared_tensor, 'name', shared_tensor)}' "
            "(their weights are tied between the trunk and a head). "
            "keras_mgda splits the model at the shared representation, so "
            "every layer must be on one side of it: use separate layers in "
            "the heads, or name with `shared=` a tensor below which no trunk "
            "layer is called again."
        )
    # Checked here, not left to `keras.Model(shared_tensor, outputs)`:
    # before Keras 3.14 that builds a "head" that silently ignores the path
    # around Z instead of raising "Graph disconnected".
    error = "an output depends on the inputs by a path around it" if not_a_cut else None
    if error is None:
        try:
            encoder = keras.Model(_keras.inputs_struct(model), shared_tensor)
            heads = keras.Model(shared_tensor, outputs)
        except ValueError as keras_error:
            error = str(keras_error)
    if error is not None:
        raise ValueError(
            f"The tensor '{getattr(shared_tensor, 'name', shared_tensor)}' "
            "is not a shared representation of this model: some output can "
            "be reached from the inputs without passing through it "
            f"({error}). Name the output of a layer that every head is "
            "built on, or leave `shared=None` to find it automatically."
        )
    return encoder, heads


def output_heads(shared_tensor: keras.KerasTensor, outputs: Sequence[keras.KerasTensor]) -> list[keras.Model]:
    """One functional sub-model from Z to each output.

    Args:
        shared_tensor: the `KerasTensor` Z.
        outputs: the model's output tensors, flat.

    Returns:
        A list of functional models, one per output, sharing the model's
        layers and weights.
    """
    return [keras.Model(shared_tensor, output) for output in outputs]


def _owners(head):
    """Ids of the layers (inputs aside) and variables a head uses."""
    layers = {id(layer) for layer in head.layers if not isinstance(layer, keras.layers.InputLayer)}
    return layers | {id(v) for v in head.variables}


def _connected_components(owners):
    """Groups of indices whose owner sets overlap, directly or through
    others (union-find), in order of their first member."""
    parent = list(range(len(owners)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(owners)):
        for j in range(i):
            if owners[i] & owners[j]:
                parent[root(i)] = root(j)
    members = {}
    for i in range(len(owners)):
        members.setdefault(root(i), []).append(i)
    return list(members.values())


def head_groups(
    heads: Sequence[keras.Model], shared_tensor: keras.KerasTensor, outputs: Sequence[keras.KerasTensor]
) -> list[tuple[list[int], keras.Model]]:
    """The outputs grouped so that no two groups' heads share a layer or a
    variable.

    Usually every output is its own group. Heads that share a layer must
    run once together, or the shared layer would update its state
    (BatchNorm statistics, dropout seeds) once per output.

    Args:
        heads: `output_heads(shared_tensor, outputs)`.
        shared_tensor: the `KerasTensor` Z.
        outputs: the model's output tensors, flat.

    Returns:
        A list of `(output_indices, head)`: `head` is a functional model from
        Z to those outputs (for one output, its model from `heads`,
        returning a tensor; for several, a model returning a list in the
        order of `output_indices`).
    """
    groups = []
    for indices in _connected_components([_owners(head) for head in heads]):
        if len(indices) == 1:
            head = heads[indices[0]]
        else:
            head = keras.Model(shared_tensor, [outputs[i] for i in indices])
        groups.append((indices, head))
    return groups
