#!/usr/bin/env bash
# call 12-06 H: the pick folded to one reduction per quantity, the peeled attention kernel, triton_linear qkv; against
# main (45b035f, .run/base_tree) on the same machine; decode_parts pick (both), attention peel grid, linear qkv/gate_up
set -o pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
T0=$(date +%s); END=$((T0 + ${BUDGET:-500}))
cat .run/base.txt > $OUT/commit.txt; git status --short 2>/dev/null >> $OUT/commit.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt; cat $OUT/gpu.txt
export PYTHONPATH=/tmp/site:$PWD
python3 -m bench.bench_sampler --rows 32x512@triton 32x512@triton-peel 32x512@triton-linqkv \
  --repeats 3 --deadline $((END - 240)) --out $OUT/rows.jsonl > $OUT/sampler.log 2>&1
echo "sampler done $(( $(date +%s) - T0 )) s"; grep -E "^\| 32x" $OUT/sampler.log | sort -u
(cd .run/base_tree && PYTHONPATH=/tmp/site:$PWD python3 -m bench.bench_sampler --rows 32x512@triton --repeats 3 \
  --deadline $((END - 170)) --out $OUT/base_rows.jsonl > $OUT/base_sampler.log 2>&1)
echo "base done $(( $(date +%s) - T0 )) s"; grep -E "^\| 32x" $OUT/base_sampler.log | sort -u
(cd .run/base_tree && PYTHONPATH=/tmp/site:$PWD timeout 40 python3 -m bench.decode_parts --parts pick --batches 32 256 \
  --out $OUT/base_pick.json > $OUT/base_pick.log 2>&1)
timeout 40 python3 -m bench.decode_parts --parts pick --batches 32 256 --out $OUT/pick.json > $OUT/pick.log 2>&1
echo "pick done $(( $(date +%s) - T0 )) s"; grep -E "^\| " $OUT/base_pick.log $OUT/pick.log | grep -v "\-\-\-"
timeout $((END - $(date +%s) - 75)) python3 -m bench.decode_parts --parts attention linear --rows 32x512 32x4096 256x1024 \
  --grid block=64 warps=4 stages=3 splits=1 peel=0,1 --batches 32 --maps qkv gate_up --out $OUT/parts.json > $OUT/parts.log 2>&1
echo "parts done $(( $(date +%s) - T0 )) s"; grep -E "^\| (32|256)" $OUT/parts.log | sort -t'|' -k6 -n | head -30
timeout $((END - $(date +%s) - 2)) python3 -m pytest tests/test_sampling.py -q -p no:cacheprovider \
  -k "pick or projections_matches or peeled or norms_folded" 2>&1 | tail -3 | tee $OUT/tests.log
echo "tests done $(( $(date +%s) - T0 )) s"
