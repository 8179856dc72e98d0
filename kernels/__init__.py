"""Triton kernels for ovfast, installed as the subpackage ``ovfast.kernels``.

This folder is mapped to ``ovfast.kernels`` by setup.py (a top-level ``kernels`` module would clash
with the PyPI package of that name). Each kernel replaces one function of ``ovfast.ops`` and is
tested against it under ``TRITON_INTERPRET=1``.
"""
