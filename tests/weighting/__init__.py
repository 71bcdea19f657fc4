"""Tests of the Gram-matrix weightings (MGDA, PCGrad, CAGrad, IMTL-G,
Nash-MTL, Aligned-MTL, UPGrad): one module per method, calling the shared
property assertions of `_asserts.py` on that method's problems, plus its
own defining conditions against the references of `tests/references.py`
and `tests/qp_reference.py`, and torchjd's implementation on torch.

Being a package puts `tests/` on `sys.path`, so `qp_reference` and
`references` import as they do from the modules beside them.
"""
