# session 51, second call: the GPU tests over the build path (phases), then bench pergpu2's JSON on the device
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
s=$(date +%s)
timeout ${TT:-430} python3 -m pytest -q -p no:cacheprovider -rfEs --durations=8 ${GTESTS:-tests/gpu/test_gpu_engine.py \
    tests/gpu/test_cuda_graphs.py tests/gpu/test_engines_per_gpu.py tests/gpu/test_activation_reserve.py} > $OUT/gpu_tests.log 2>&1
tail -14 $OUT/gpu_tests.log; echo "tests $(( $(date +%s) - s )) s"
timeout 120 python3 -m batchllm.cli bench --model benchmarks/configs/smollm2-135m --load-format dummy --workload shared \
    --shared 25 --distinct 13 --degree 1000 --output 64 --requests 6000 --configs pergpu2 --json-out $OUT/pergpu2.json \
    > $OUT/pergpu2.log 2>&1; tail -3 $OUT/pergpu2.log
python3 -c "import json; d=json.load(open('$OUT/pergpu2.json')); print({k: d.get(k) for k in ('device','dtype','model')}, [(r['device'], r['build_phases']) for r in d['results'][0]['ranks']])"
echo "all done at $(( $(date +%s) - s )) s"
