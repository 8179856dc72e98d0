"""What a checkpoint directory holds, read without the model: config.json, the weight files
(local or Hub cache), tensor names, weight streaming, tokenizer and chat template.

May import: ``ovfast.errors`` and third-party readers (safetensors, tokenizers, huggingface_hub,
jinja2). Never imports inputs, models or runtime: the model hands ``weights`` its destinations.
"""
