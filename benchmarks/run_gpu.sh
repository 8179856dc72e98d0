#!/usr/bin/env bash
# On a lent GPU: the GPU test marker, then the benchmarks for 0.5B and 7B (and, with 2+ GPUs, tensor
# parallelism for 7B and 72B), results left in
# benchmarks/results/ (commit them). Budget: well under 10 minutes on an H100.
#   bash benchmarks/run_gpu.sh            # everything
#   NEW_TOKENS=64 bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
day=$(date +%F)
new=${NEW_TOKENS:-256}
status=0

echo "== GPU tests (pytest -m gpu)"
python -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/$day-gpu-tests.log" || status=1

echo "== kernel benchmarks"
for script in benchmarks/bench_kernels.py benchmarks/bench_decoder_kernels.py; do
    [ -f "$script" ] && { python "$script" 2>&1 | tee -a "$out/$day-kernels.log" || status=1; }
done

echo "== end to end against transformers"
for model in 0.5b 7b; do
    for request in image text; do
        python -m ovfast bench --model "$model" --request "$request" --new-tokens "$new" --repeat 2 --out-dir "$out" || status=1
    done
done
python -m ovfast bench --model 0.5b --request video32 --new-tokens 64 --repeat 2 --out-dir "$out" || status=1
python -m ovfast bench --model 7b --request image10 --new-tokens 64 --repeat 2 --out-dir "$out" || status=1

echo "== serving: 32 concurrent image clients against one at a time"
python -m ovfast bench --model 0.5b --concurrency 32 --requests 96 --mix image:1 --new-tokens 128 --out-dir "$out" || status=1

gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    echo "== tensor parallelism over $gpus GPUs (7B on 2; 72B where they hold it)"
    python -m ovfast bench --model 7b --request image --new-tokens "$new" --repeat 2 --no-transformers --out-dir "$out" || status=1
    python -m ovfast bench --model 7b --request image --new-tokens "$new" --repeat 2 --no-transformers --tensor-parallel-size 2 --out-dir "$out" || status=1
    python -m ovfast bench --model 72b --request image --new-tokens 64 --repeat 1 --no-transformers --tensor-parallel-size "$([ "$gpus" -ge 4 ] && echo 4 || echo 2)" --out-dir "$out" || status=1
fi
exit $status
