"""The engine that runs requests: request building (prompt ids, placeholders, limits), sequences
and their text, the static decode step and its CUDA graphs, the KV cache.

May import every stage below it: errors, settings, checkpoint, inputs, ops, models. Nothing below imports it.
"""
