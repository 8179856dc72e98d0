"""Tokenisation, decoding and chat-template rendering against transformers."""
from __future__ import annotations

import random

import pytest
import reference as ref
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from ovfast.checkpoint.tokenizer import ChatTemplate
from ovfast.checkpoint.prompts import LLAVA_OV_CHAT_TEMPLATE
from ovfast.testing.random_tokenizer import SPECIAL_TOKENS, build_tokenizer

TEXTS = [
    "What is shown in this image?",
    "  leading spaces, trailing spaces   ",
    "Line one\nLine two\r\n\n\ttabbed",
    "Numbers 1234567 and 3.14159, 2024-11-25!",
    "Ünïcödé: café, naïve, Straße; 東京は日本の首都です。🙂👍🏽",
    "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n",
    "don't won't it's I'll we've they're",
    "",
]


def test_encode_matches_transformers(ckpt):
    path, engine = ckpt
    hf = AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert engine.tokenizer.encode(text) == hf(text)["input_ids"], text


def test_decode_matches_transformers(ckpt):
    path, engine = ckpt
    hf = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    n = engine.tokenizer.vocab_size
    for _ in range(50):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 30))]
        assert engine.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "n_images,n_videos,text",
    [(0, 0, "hello"), (1, 0, "What is shown?"), (3, 0, "compare"), (0, 1, "video?"), (2, 1, "both"), (1, 0, "")],
)
def test_chat_prompt_matches_processor(ckpt, n_images, n_videos, text):
    path, engine = ckpt
    content = [{"type": "text", "text": text}] + [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
    expected = ref.processor(path).apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ours = engine.requests.template.render(
        [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
          + [{"type": "text", "text": text}]}],
        add_generation_prompt=True, **engine.tokenizer.special_tokens_map,
    )
    assert ours == expected


def test_generation_tag_and_multi_turn_render_like_transformers():
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
    ]
    expected, _ = render_jinja_template([conversation], chat_template=LLAVA_OV_CHAT_TEMPLATE, add_generation_prompt=True)
    assert ChatTemplate(LLAVA_OV_CHAT_TEMPLATE).render(conversation, add_generation_prompt=True) == expected[0]
    template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'x' %}{{ raise_exception('bad') }}{% endif %}{{ m['content'] | tojson }}{% endfor %}"
    msgs = [{"role": "user", "content": "héllo"}]
    expected, _ = render_jinja_template([msgs], chat_template=template, bos_token="<s>")
    assert ChatTemplate(template).render(msgs, bos_token="<s>") == expected[0]


def test_real_size_tokenizer_has_qwen2_special_ids():
    tok = build_tokenizer(151643)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [151643, 151644, 151645, 151646, 151647]
    assert tok.get_vocab_size() == 151648
    ids = tok.encode("<|im_start|>user\n<image>\nHello<|im_end|>").ids
    assert ids[0] == 151644 and 151646 in ids and ids[-1] == 151645
