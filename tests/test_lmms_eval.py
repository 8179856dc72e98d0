"""lmms-eval's ``ovfast`` model driven with hand-made Instances (a fake task_dict, no downloads).

lmms-eval's full install pulls its own torch / torchvision and a hundred packages, so the README's
test command installs it with ``--no-deps`` (loguru and pytz, all these imports need, are in the
test extra).
"""
from __future__ import annotations

import importlib.metadata
import secrets

import numpy as np
import pytest

import reference as ref
from lmms_eval.api.instance import Instance

import ovfast
from ovfast.integrations.lmms_eval import OvfastLMM, sampling_params

TASK, SPLIT = "fake_task", "test"
WORDS = ["sea", "cat", "red", "tree", "moon", "blue", "river", "stone", "light", "quick"]


@pytest.fixture(scope="module")
def lmm(checkpoint_dirs):
    model = OvfastLMM.create_from_arg_string(
        f"pretrained={checkpoint_dirs['tiny']},dtype=float32,max_batch_size=3,max_seq_len=8192,semantics=original",
        {"batch_size": 2},
    )
    yield model
    model.clean()


@pytest.fixture
def docs(lmm):
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)

    def words(n):
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))

    def image():
        return ref.synthetic_image(int(rng.integers(40, 400)), int(rng.integers(40, 400)), int(rng.integers(1 << 30)))

    rows = [
        {"images": [image()], "question": "What is it? " + words(3), "answer": " " + words(2)},
        {"images": [image(), image()], "question": "Compare: " + words(2), "answer": " " + words(3)},
        {"images": [], "question": "Say " + words(4), "answer": " " + words(1)},
        {"images": [image()], "question": "<image>\nAt the marker: " + words(2), "answer": " " + words(2)},
        {"images": [image()], "question": "One more " + words(5), "answer": " " + words(4)},
    ]
    lmm.task_dict = {TASK: {SPLIT: rows}}
    return rows


def _visual(doc):
    return doc["images"]


def _instance(kind, args, i):
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1})


def _engine_prompt(doc):
    # what the original semantics does with a context: markers kept; none -> "<image> <image>\n" before it
    q, n = doc["question"], len(doc["images"])
    return q if "<image>" in q or not n else " ".join(["<image>"] * n) + "\n" + q


def test_generate_until_matches_engine(lmm, docs):
    engine = lmm.engine
    assert engine.model_config.semantics == "original"
    gen_kwargs = {"max_new_tokens": 6, "temperature": 0, "do_sample": False, "num_beams": 1, "until": ["\n\n"]}
    requests = [_instance("generate_until", (d["question"], dict(gen_kwargs), _visual, i, TASK, SPLIT), i)
                for i, d in enumerate(docs)]
    out = lmm.generate_until(requests)
    assert len(out) == len(docs) and all(isinstance(x, str) for x in out)
    for doc, text in zip(docs, out):
        expected = engine.generate(doc["images"], _engine_prompt(doc), max_new_tokens=6, stop=["\n\n"]).strip()
        assert text == expected
    # a single image without a marker is exactly the engine's own placement
    assert out[0] == engine.generate(docs[0]["images"], docs[0]["question"], max_new_tokens=6, stop=["\n\n"]).strip()
    assert engine.stats()["free_slots"] == engine.max_batch_size


def test_loglikelihood_matches_engine(lmm, docs):
    engine = lmm.engine
    requests = [_instance("loglikelihood", (d["question"], d["answer"], _visual, i, TASK, SPLIT), i)
                for i, d in enumerate(docs)]
    # doc_to_target may also be a function of the doc
    requests.append(_instance("loglikelihood", (docs[0]["question"], lambda doc: doc["answer"], _visual, 0, TASK, SPLIT), 0))
    out = lmm.loglikelihood(requests)
    assert len(out) == len(requests)
    for (logprob, greedy), doc in zip(out, docs + [docs[0]]):
        assert isinstance(logprob, float) and isinstance(greedy, bool)
        assert (logprob, greedy) == engine.loglikelihood(doc["images"], _engine_prompt(doc), doc["answer"])
        assert logprob < 0


def test_video_files_use_max_frames_num(lmm, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 6, dtype=np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    (item,) = lmm._items([str(path)], {})
    assert isinstance(item, ovfast.Video) and item.num_frames == 32
    assert lmm._items(["photo.PNG"], {}) == ["photo.PNG"]  # an image file by its suffix
    frames = [ref.synthetic_image(30, 40, i) for i in range(10)]
    (video,) = lmm._items(frames, {"task_type": "video", "sample_frames": 4})
    assert isinstance(video, ovfast.Video) and video.num_frames == 4


def test_gen_kwargs():
    assert sampling_params({}) == {"max_new_tokens": 1024}
    p = sampling_params({"until": "\n", "max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9})
    assert p == {"max_new_tokens": 7, "stop": ["\n"]}  # no do_sample: greedy, as transformers' generate
    p = sampling_params({"do_sample": True, "temperature": 0.5, "top_p": 0.8, "until": ["", "END"]})
    assert p == {"max_new_tokens": 1024, "temperature": 0.5, "top_p": 0.8, "stop": ["END"]}
    with pytest.raises(ovfast.GenerationParamsError, match="beam"):
        sampling_params({"num_beams": 4})


def test_errors_name_the_doc(lmm, docs):
    bad = _instance("generate_until", (docs[0]["question"], {"num_beams": 3}, _visual, 0, TASK, SPLIT), 0)
    with pytest.raises(ovfast.GenerationParamsError, match=f"{TASK} doc 0"):
        lmm.generate_until([bad])
    empty = _instance("loglikelihood", (docs[0]["question"], "", _visual, 0, TASK, SPLIT), 0)
    with pytest.raises(ovfast.OvfastError, match="empty"):
        lmm.loglikelihood([empty])
    with pytest.raises(NotImplementedError, match="multi_round"):
        lmm.generate_until_multi_round([])
    with pytest.raises(ovfast.ConfigError, match="pretrained"):
        OvfastLMM()
    with pytest.raises(ovfast.ConfigError, match="unknown"):
        OvfastLMM(pretrained="x", conv_template="qwen_1_5")


def test_entry_point_resolves():
    (ep,) = [e for e in importlib.metadata.entry_points(group="lmms_eval.models") if e.name == "ovfast"]
    manifest = ep.load()()
    assert manifest.model_id == "ovfast" and manifest.simple_class_path.endswith("OvfastLMM")
    models = pytest.importorskip("lmms_eval.models")  # lmms-eval's own registry reads the entry point
    assert models.get_model("ovfast") is OvfastLMM
