"""Small helpers of `keras_mgda.numerics` against NumPy."""

import keras
import numpy as np
import pytest

from keras_mgda import numerics as nx


def test_diagonal_matrix_is_numpys_diag_even_with_an_infinite_entry():
    """An infinite entry stays on the diagonal (eye * v would put NaN,
    0 * inf, beside it)."""
    vector = np.array([2.0, np.inf, -0.5], "float32")
    got = keras.ops.convert_to_numpy(nx.diagonal_matrix(keras.ops.convert_to_tensor(vector), ops=keras.ops))
    np.testing.assert_array_equal(got, np.diag(vector))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's XLA path")
def test_diagonal_matrix_compiles_with_tensorflow_xla_into_a_solve():
    """Keras's TensorFlow `ops.diag` up to 3.12 put a `tf.cond` in front of
    the solve, which XLA refused ('dynamic dimension'); this one compiles."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def ridged_solve(matrix, ridge, rhs):
        return keras.ops.solve(matrix + nx.diagonal_matrix(ridge, ops=keras.ops), rhs)

    matrix = np.array([[2.0, 0.5], [0.5, 1.0]], "float32")
    ridge, rhs = np.array([0.1, 0.2], "float32"), np.array([1.0, -1.0], "float32")
    expected = np.linalg.solve(matrix + np.diag(ridge), rhs)
    np.testing.assert_allclose(ridged_solve(matrix, ridge, rhs).numpy(), expected, rtol=1e-5)
