"""The public API: complete / generate / stream / complete_many, stopping, sampling, timings, threads."""
from __future__ import annotations

import json
import shutil
import threading

import reference as ref

import ovfast
from ovfast.checkpoint.tokenizer import IncrementalDecoder


def test_completion_fields(tiny):
    _, engine = tiny
    image = ref.synthetic_image(480, 640, seed=1)
    c = engine.complete(image, "What is shown in this image?", max_new_tokens=5)
    assert len(c.token_ids) == 5 and c.finish_reason == "length"
    assert c.prompt_tokens == 2929 + len(engine.tokenizer.encode(
        "<|im_start|>user\n\nWhat is shown in this image?<|im_end|>\n<|im_start|>assistant\n"))
    assert c.text == engine.tokenizer.decode(c.token_ids)
    t = c.timings
    assert t.preprocess_ms > 0 and t.vision_ms > 0 and t.prefill_ms > 0 and t.decode_ms > 0
    assert t.decode_tokens == 4 and t.decode_tokens_per_s > 0
    assert set(t.as_dict()) == {"preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "decode_tokens_per_s"}
    assert engine.generate(image, "What is shown in this image?", max_new_tokens=5) == c.text


def test_module_level_generate_caches_the_engine(tiny):
    path, engine = tiny
    image = ref.synthetic_image(100, 100, seed=2)
    text = ovfast.generate(image, "Hi", model=path, max_new_tokens=4)
    assert text == engine.generate(image, "Hi", max_new_tokens=4)
    assert ovfast.get_engine(path) is ovfast.get_engine(path)


def test_stream_pieces_join_to_the_completion(ckpt):
    _, engine = ckpt
    image = ref.synthetic_image(300, 200, seed=3)
    pieces = list(engine.stream(image, "Describe.", max_new_tokens=16))
    assert "".join(pieces) == engine.complete(image, "Describe.", max_new_tokens=16).text
    assert all(pieces)


def test_incremental_decoder_never_splits_a_character(tiny):
    _, engine = tiny
    text = "Straße, 東京は日本の首都です 🙂 naïve façade — done."
    ids = engine.tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # multi-byte characters span several byte-level tokens
    dec = IncrementalDecoder(engine.tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_truncates_text_and_stream(tiny):
    _, engine = tiny
    full = engine.complete(None, "Tell me a story about a lighthouse.", max_new_tokens=12)
    # A stop string made of the answer's middle: generation must stop on the token completing it.
    stop = full.text[4:7]
    assert len(stop) == 3 and full.text.find(stop) == 4
    c = engine.complete(None, "Tell me a story about a lighthouse.", max_new_tokens=12, stop=["never-seen", stop])
    assert c.finish_reason == "stop"
    assert c.text == full.text[:4]
    assert c.token_ids == full.token_ids[: len(c.token_ids)] and len(c.token_ids) < 12
    assert stop in engine.tokenizer.decode(c.token_ids)
    streamed = "".join(engine.stream(None, "Tell me a story about a lighthouse.", max_new_tokens=12, stop=stop))
    assert streamed == c.text


def test_eos_from_generation_config_stops_like_transformers(tiny, tmp_path):
    path, engine = tiny
    prompt = "Tell me a story about a lighthouse."
    free = engine.complete(None, prompt, max_new_tokens=12).token_ids
    eos_token = free[3]
    assert eos_token not in free[:3]
    ckpt = tmp_path / "eos"
    shutil.copytree(path, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], eos_token]
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    e2 = ovfast.load(ckpt, max_seq_len=512, max_batch_size=1)
    c = e2.complete(None, prompt, max_new_tokens=12)
    assert c.finish_reason == "stop" and c.token_ids == free[:4]
    assert c.token_ids == ref.greedy(str(ckpt), [], prompt, 12)
    forced = e2.complete(None, prompt, max_new_tokens=12, ignore_eos=True)  # benchmarks need fixed lengths
    assert forced.token_ids == free and forced.finish_reason == "length"


def test_sampling_is_reproducible_under_seed(ckpt):
    _, engine = ckpt
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50)
    a = engine.complete(None, "Sample something.", seed=123, **kw)
    b = engine.complete(None, "Sample something.", seed=123, **kw)
    assert a.token_ids == b.token_ids
    others = {tuple(engine.complete(None, "Sample something.", seed=s, **kw).token_ids) for s in range(5)}
    assert len(others) > 1  # the seed matters
    greedy = engine.complete(None, "Sample something.", max_new_tokens=10).token_ids
    assert engine.complete(None, "Sample something.", seed=1, max_new_tokens=10, temperature=1e-4).token_ids == greedy
    many = engine.complete_many([(None, "Sample something."), (None, "Other.")], seed=123, **kw)
    assert many[0].token_ids == a.token_ids  # per-request generators: batching changes no draw


def test_top_k_one_is_greedy(tiny):
    _, engine = tiny
    greedy = engine.complete(None, "Anything.", max_new_tokens=8).token_ids
    assert engine.complete(None, "Anything.", max_new_tokens=8, temperature=5.0, top_k=1, seed=0).token_ids == greedy


def test_concurrent_callers_are_serialised(tiny):
    _, engine = tiny
    prompts = [f"Question number {i}?" for i in range(4)]
    expected = [engine.complete(None, p, max_new_tokens=6).token_ids for p in prompts]
    results = {}

    def worker(i):
        results[i] = engine.complete(None, prompts[i], max_new_tokens=6).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == expected


def test_open_stream_does_not_block_its_thread(tiny):
    """The engine is shared: with a stream open, the same thread can run other requests, and the
    stream still ends with its solo answer."""
    _, engine = tiny
    solo = engine.complete(None, "Hello", max_new_tokens=8).text
    again = engine.complete(None, "Again", max_new_tokens=2)
    it = engine.stream(None, "Hello", max_new_tokens=8)
    first = next(it)
    assert engine.complete(None, "Again", max_new_tokens=2).token_ids == again.token_ids
    assert first + "".join(it) == solo
    assert engine.stats()["running"] == 0


def test_random_weights_are_flagged(tiny):
    _, engine = tiny
    assert engine.random_weights
