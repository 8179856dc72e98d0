"""Prompt formats: the llava-hf processor's chat template and the original ``qwen_1_5`` conversation.

llava-hf checkpoints carry their template (rendered by ``tokenizer.ChatTemplate``); the original
lmms-lab checkpoints carry none, and LLaVA-NeXT formats prompts in code with its ``qwen_1_5``
conversation (CHATML with a default system message). Both take the same conversation: a list of
``{"role", "content": [{"type": "text" | "image" | "video", ...}]}`` turns.
"""
from __future__ import annotations

# The chat template the llava-hf conversion script installs as the processor's template.
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN_1_5_SYSTEM = "You are a helpful assistant."
IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"


def render_qwen_1_5(conversation: list[dict], add_generation_prompt: bool = True) -> str:
    """LLaVA-NeXT's ``conv_qwen_1_5.get_prompt()`` for a conversation.

    A leading system turn replaces the default system message (an empty one drops the block). Media parts become a marker and a
    newline where they stand in their turn (the original tutorial's ``"<image>\\n" + question``);
    text parts are joined as they are.
    """
    system = QWEN_1_5_SYSTEM
    turns = conversation
    if turns and turns[0]["role"] == "system":
        system = "".join(p["text"] for p in turns[0]["content"] if p["type"] == "text")
        turns = turns[1:]
    out = [f"<|im_start|>system\n{system}<|im_end|>\n"] if system else []  # an empty system: no block
    for turn in turns:
        body = "".join(
            p["text"] if p["type"] == "text" else (VIDEO_MARKER if p["type"] == "video" else IMAGE_MARKER) + "\n"
            for p in turn["content"]
        )
        out.append(f"<|im_start|>{turn['role']}\n{body}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
