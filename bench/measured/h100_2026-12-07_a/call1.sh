# call 12-07 A: the loads-first attention kernel (staged patch) vs main 5e67372 (.run/base_tree), same machine
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$PWD; B=$R/.run/base_tree; END=$(( $(date +%s) + ${BUDGET:-560} ))
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
left() { echo $(( END - $(date +%s) )); }
echo "== tests"; timeout 150 python3 -m pytest tests/test_sampling.py -q -x -p no:cacheprovider -k "variants_compute or asks_for or greedy_with_the_triton_kernel or gated or norms_folded or check_covers" 2>&1 | tail -4
echo "== attention alone, new"; timeout 90 python3 -m bench.decode_parts --parts attention --rows 32x512 32x4096 --grid block=64 warps=4 stages=3 splits=1 peel=0 prefetch=0,1,2 --out $OUT/attn_new.json 2>&1 | grep "^| 32" | head -12
echo "== attention alone, base"; (cd $B && PYTHONPATH=/tmp/site:$B timeout 90 python3 -m bench.decode_parts --parts attention --rows 32x512 32x4096 --grid block=64 warps=4 stages=3 splits=1 peel=0 --out $OUT/attn_base.json 2>&1 | grep "^| 32" | head -6)
echo "== sampler new 32x512"; timeout $(( $(left) - 200 )) python3 -m bench.bench_sampler --rows 32x512@triton 32x512@triton-pf1 32x512@triton-cpre --repeats 3 --out $OUT/rows.jsonl 2>&1 | grep "^| 32\|bandwidth"
echo "== sampler base 32x512"; (cd $B && PYTHONPATH=/tmp/site:$B timeout $(( $(left) - 120 )) python3 -m bench.bench_sampler --rows 32x512@triton --repeats 3 --out $OUT/base_rows.jsonl 2>&1 | grep "^| 32\|bandwidth")
echo "== phases new"; timeout $(( $(left) - 60 )) python3 .run/phases.py 32 2>&1 | grep "^{" 
echo "== sampler new again + 32x4096"; timeout $(( $(left) - 5 )) python3 -m bench.bench_sampler --rows 32x512@triton 32x4096@triton --repeats 3 --deadline $END --out $OUT/rows.jsonl 2>&1 | grep "^| 32\|bandwidth"
echo "== done, $(left) s left"
