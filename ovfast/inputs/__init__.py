"""Everything from what a user hands in to uint8 tiles and token counts: decoding (images, bytes,
arrays, ``Video``, video files), AnyRes geometry, CPU tiling (native ``_C`` or Python), device tiling.

``items.open_item`` is the one entry point per item. May import: ``ovfast.errors``, ``ovfast.settings``,
``ovfast.checkpoint.config``, ``ovfast._C`` and, lazily for device tiling, ``ovfast.kernels``.
Never imports models or runtime.
"""
