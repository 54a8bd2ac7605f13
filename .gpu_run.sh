set -o pipefail
B="python -m framework.run task=bench model=llama3_8b_dummy cache.max_model_len=2048 task.compare_hf=false"
W="task.num_requests=256 task.input_len_range=[100,1024] task.output_len_range=[512,512]"
S=$(date +%s)
el() { echo "## $(( $(date +%s) - S )) s: $*"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
el smoke; timeout 60 python .gpu_smoke.py 2>&1 | tee $OUT/smoke.log | tail -30
el bench_quant; timeout 150 python -m kernels.bench_quant > $OUT/bench_quant.log 2>&1; echo rc $?
el warmup; timeout 70 $B task.num_requests=32 task.input_len_range=[100,1024] task.output_len_range=[64,128] task.decode_batch1_tokens=0 quantization=int8 > $OUT/warm.log 2>&1; echo rc $?; grep -E "ours:" $OUT/warm.log
for q in int4 none int8; do el $q; timeout 100 $B $W quantization=$q > $OUT/bench_$q.log 2>&1; echo rc $?; grep -E "ours:|batch-1 decode|device memory in use|Error|error" $OUT/bench_$q.log | head -8; done
el tests; timeout 60 python -m pytest -q -x -m gpu tests/kernels/test_kernel_int8_linear.py tests/kernels/test_kernel_quant_gemv.py tests/kernels/test_kernel_quant_matmul.py > $OUT/gpu_tests.log 2>&1; tail -3 $OUT/gpu_tests.log
el done
