#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (the lease is short): the CUDA tests, where a recording makes the host
# wait for the GPU, issue 20's GPU rows (per-method overheads of ViT-S and ViT-B; `qkhooks record` over a folder
# against a plain loop for ViT-Ti and ViT-S), a profile of the host's time in a recording, and GPU peak memory. Run
# from the repository root on the GPU machine; results land in $OUT (merge results.json into
# benchmarks/results.json here, then `python benchmarks/run.py --render-only`). Each step has its own time limit,
# so a slow one cannot starve the rest; the whole script stays under ~7 minutes. STEPS picks some of them.
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh
#   OUT=/tmp/gpu STEPS="tests syncs" bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/qkhooks-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
BENCH=("$PY" benchmarks/run.py --device cuda --threads 2 --json "$OUT/results.json" --out "$OUT/RESULTS.md"
       --notes /nonexistent)
STEPS=${STEPS:-tests syncs methods e2e profile writer memory}
step() { echo "== $1 ($(date +%T))"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
exec > >(tee -a "$OUT/session.log") 2>&1

step environment
nvidia-smi -L
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,utilization.gpu,memory.used --format=csv
"$PY" -c "import torch, timm, transformers, h5py, numpy, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'h5py', h5py.__version__, 'numpy', numpy.__version__, 'gpu', torch.cuda.get_device_name(0))"
echo "cores: $(nproc)"

want tests && step "CUDA tests" &&
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py tests/test_device_transfers.py tests/test_writer_handoff.py 2>&1 | tail -30

want syncs && step "host-device synchronisations per batch (ViT-S, batch 32)" &&
timeout 90 "$PY" benchmarks/gpu_syncs.py --batch 32 --json "$OUT/syncs.json"

want methods && step "methods: ViT-S and ViT-B, batch 32" &&
timeout 150 "${BENCH[@]}" --fresh --models vit_s,vit_b --sections methods --batch 32 --rounds 12 2>&1 | grep -v "^  round"

want e2e && step "end to end: ViT-Ti and ViT-S, 960 JPEGs" &&
timeout 120 "${BENCH[@]}" --models vit_ti,vit_s --sections end_to_end --e2e-images 960 --e2e-rounds 3

want profile && step "profile of the host in record_dataset (ViT-Ti, 960 JPEGs)" &&
timeout 60 "$PY" benchmarks/profile_record.py --device cuda --model vit_ti --images 960 --top 40 \
    --out "$OUT/profile_vit_ti.txt" > /dev/null && head -c 5000 "$OUT/profile_vit_ti.txt"

want writer && step "HDF5 writer beside the GPU (ViT-S, batch 32)" &&
timeout 90 "${BENCH[@]}" --models vit_s --sections writer --batch 32 --compressions none,none@batch

# not in the default STEPS: the writer thread's waits for the GIL (benchmarks/writer_gil.py), the full recording and
# end to end again with the interpreter switching threads every 0.5 ms instead of 5 (their own keys in results.json)
want switch && step "full recording and end to end, switch interval 0.5 ms (ViT-S, ViT-B; ViT-Ti)" &&
timeout 150 "${BENCH[@]}" --models vit_s,vit_b --sections methods --batch 32 --rounds 12 --methods plain,full_hdf5 \
    --switch-interval 0.0005 2>&1 | grep -v "^  round" &&
timeout 100 "${BENCH[@]}" --models vit_ti --sections end_to_end --e2e-images 960 --e2e-rounds 3 --switch-interval 0.0005

want memory && step "GPU peak memory (ViT-S, batch 32)" &&
timeout 150 "${BENCH[@]}" --models vit_s --sections memory --batch 32 \
    --methods plain,capture,modes16,rows2,full_maps,full_maps_eager,full_hdf5,timm_extract
step done
