# call 12-07 I: Triton kernels not specialised on the prompt length / live rows (working tree) vs c2939b3 (.run/base_main), same machine; BUDGET=380 bash call_i.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$PWD; B=$R/.run/base_main; END=$(( $(date +%s) + ${BUDGET:-380} ))
nvidia-smi --query-gpu=name --format=csv,noheader
left() { echo $(( END - $(date +%s) )); }
echo "== grpo fast-512"; timeout $(( $(left) - 95 )) python3 -m bench.bench_grpo --variants fast-512 --fixes cold-jit-cache --steps 12 --deadline $(( END - 100 )) --out $OUT/i_grpo.json > $OUT/i_grpo.log 2>&1; grep "^| fast\|^- fast" $OUT/i_grpo.log
echo "== sampler new 32x512"; timeout $(( $(left) - 50 )) python3 -m bench.bench_sampler --rows 32x512@triton --repeats 3 --out $OUT/i_rows.jsonl 2>&1 | grep "^| 32\|bandwidth\|Error" | head -2
echo "== sampler base 32x512"; (cd $B && PYTHONPATH=/tmp/site:$B timeout $(( $(left) - 3 )) python3 -m bench.bench_sampler --rows 32x512@triton --repeats 3 --out $OUT/i_base_rows.jsonl 2>&1 | grep "^| 32\|bandwidth\|Error" | head -2)
echo "== tests"; timeout $(( $(left) - 3 )) python3 -m pytest tests/test_sampling.py -q -x -p no:cacheprovider -k "compile_once_for_every or fused_prefill or gated" 2>&1 | tail -3
echo "== done, $(left) s left"
