# call 12-07 E (H200 or H100): the fused prefill (the working tree) vs main 0af46db (.run/base_tree), same machine
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$PWD; B=$R/.run/base_tree; END=$(( $(date +%s) + ${BUDGET:-280} ))
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
left() { echo $(( END - $(date +%s) )); }
echo "== sampler new 32x512"; timeout $(( $(left) - 120 )) python3 -m bench.bench_sampler --rows 32x512@triton-fpre 32x512@triton-epre 32x512@triton-fpre --repeats 3 --out $OUT/rows.jsonl 2>&1 | grep "^| 32\|bandwidth\|Error" | head -8
echo "== sampler base 32x512"; (cd $B && PYTHONPATH=/tmp/site:$B timeout $(( $(left) - 70 )) python3 -m bench.bench_sampler --rows 32x512@triton --repeats 3 --out $OUT/base_rows.jsonl 2>&1 | grep "^| 32\|bandwidth\|Error" | head -4)
echo "== tests"; timeout $(( $(left) - 3 )) python3 -m pytest tests/test_sampling.py -q -x -p no:cacheprovider -k "fused_prefill or prefill_kernels or falls_back_to_transformers_layers_once or fused_decode_layers" 2>&1 | tail -3
echo "== done, $(left) s left"
