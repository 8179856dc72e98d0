"""Model components: SigLIP tower, Qwen2 decoder, and the LLaVA-OneVision glue."""
