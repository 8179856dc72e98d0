"""Command-line jobs built on the public API: ``ovfast bench`` and the demo behind ``ovfast demo``.

May import anything in ovfast, including ``ovfast.testing`` (random checkpoints for benchmarks).
"""
