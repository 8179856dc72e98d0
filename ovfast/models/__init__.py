"""Model components: SigLIP tower, Qwen2 decoder, and the LLaVA-OneVision glue (packing, weight destinations).

May import: ``ovfast.ops``, ``ovfast.checkpoint.config`` (the dataclasses), ``ovfast.errors``.
Never imports inputs or runtime: an image's geometry arrives with its features.
"""
