"""Test and benchmark support: random-weight checkpoints in the exact Hugging Face layout, their
tokenizer, and the driver of transformers' reference model (``hf_reference``, needs transformers).

May import: ``ovfast.checkpoint`` (tensor names). The engine never imports this package.
"""
