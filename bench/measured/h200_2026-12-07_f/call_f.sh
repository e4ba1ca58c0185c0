# call 12-07 F (asked for the H200): 32 x 512, the default (fused prefill) vs 0af46db (.run/base_tree), same machine, then the default again in a third process; BUDGET=240 bash call_f.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$PWD; B=$R/.run/base_tree; END=$(( $(date +%s) + ${BUDGET:-240} ))
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
left() { echo $(( END - $(date +%s) )); }
echo "== sampler new 32x512"; timeout $(( $(left) - 120 )) python3 -m bench.bench_sampler --rows 32x512@triton --repeats 3 --out $OUT/rows.jsonl 2>&1 | grep "^| 32\|bandwidth\|Error" | head -3
echo "== sampler base 32x512"; (cd $B && PYTHONPATH=/tmp/site:$B timeout $(( $(left) - 60 )) python3 -m bench.bench_sampler --rows 32x512@triton --repeats 3 --out $OUT/base_rows.jsonl 2>&1 | grep "^| 32\|bandwidth\|Error" | head -3)
echo "== sampler new 32x512 again"; timeout $(( $(left) - 3 )) python3 -m bench.bench_sampler --rows 32x512@triton --repeats 3 --out $OUT/rows2.jsonl 2>&1 | grep "^| 32\|bandwidth\|Error" | head -3
echo "== done, $(left) s left"
