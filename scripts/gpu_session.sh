#!/usr/bin/env bash
# One GPU session's checks and benchmarks (BENCHMARKS.md#gpu), in the order of their worth:
# the CUDA tests, LeNet-5 throughput eager vs CUDA graphs, then the tables' sweeps on the GPU
# (`trainer.device=auto` picks it), each with its wall time. Everything small lands in $OUT.
#   OUT=/tmp/gpu PENRUN_DATA_DIR=../shared/data N_JOBS=14 scripts/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu-session}
N_JOBS=${N_JOBS:-14}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/timeline.txt"; }

log "start: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1); $(nproc) cores"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_vmf.py -k "cuda or graph" \
  >"$OUT/tests.txt" 2>&1
log "tests: $(tail -1 "$OUT/tests.txt")"
timeout 100 python3 scripts/bench_scaling.py ddp --device cuda --procs 1 --epochs 3 --variants eager graphs \
  >"$OUT/throughput.md" 2>&1
log "throughput done"

# A table: its sweep (the experiment's own launcher, N_JOBS at a time), then its report.
table() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" python3 -m penrun -m "experiment=$name" trainer.progress=false \
    "hydra.launcher.n_jobs=$N_JOBS" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? sweep=$((SECONDS - start))
  python3 -m penrun task=report "sweep_dir=outputs/multirun/$name" >>"$OUT/$name.log" 2>&1
  log "table $name: sweep exit $rc after ${sweep} s, with report $((SECONDS - start)) s"
  # The run folders' small files (metrics, configs, logs, reports), not checkpoints or
  # events, after each table: a session cut short still brings back the finished ones.
  tar czf "$OUT/outputs.tar.gz" --exclude="*.pt" --exclude="events.*" --exclude="*.png" outputs
}
table generation "${GEN_LIMIT:-300}"
table distill_labelled "${T2_LIMIT:-90}"
table distill_unlabeled "${T1_LIMIT:-120}"
log "end"
