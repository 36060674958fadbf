"""Device code: one module per backend, each with the same functions.

``torch_ops`` is the portable path (tensor primitives, any device). Fused CPU
and Triton kernels live beside it as they arrive; :mod:`batchnorm._backend`
picks one.
"""
