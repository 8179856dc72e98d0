"""Run by tests/test_tensor_parallel.py under ``torchrun --nproc-per-node 2``: every rank calls
``ovfast.load``; ranks > 0 serve rank 0 inside it and exit there; rank 0 answers and writes JSON."""
import json
import sys

import ovfast
from ovfast.tools.demo import synthetic_image

ckpt, out = sys.argv[1], sys.argv[2]
engine = ovfast.load(ckpt, dtype="float32", max_seq_len=2048, max_batch_size=3, prefill_chunk=64,
                     tensor_parallel_size=2)
with engine:
    c = engine.complete(synthetic_image(90, 140, 1), "What is in the picture?", max_new_tokens=8, ignore_eos=True)
    info = engine.info()
with open(out, "w") as f:
    json.dump({"tokens": c.token_ids, "tensor_parallel_size": info["tensor_parallel_size"],
               "weight_bytes_per_rank": info["weight_bytes_per_rank"]}, f)
