#!/usr/bin/env bash
# GPU smoke benchmark: a GPT-2-small-sized model (12 layers, 12 heads, 768 dims, block 1024)
# trained through `lmforge train` at bf16-mixed, with PyTorch's flash SDPA kernel and
# torch.compile per block, for a bounded number of steps; prints tokens/s and MFU against
# the peak passed in PEAK_FLOPS (Lightning's table misses some devices, e.g. some H200 names);
# then the same model with tensor parallelism over 2 GPUs (trainer=tp) where the machine has them.
#
#   benchmarks/gpu_smoke.sh                 # on a CUDA machine
#   PEAK_FLOPS=989e12 STEPS=100 benchmarks/gpu_smoke.sh
#   benchmarks/gpu_smoke.sh --tiny          # a seconds-long CPU run that checks this script
set -euo pipefail
cd "$(dirname "$0")/.."
LMFORGE=${LMFORGE:-.venv/bin/lmforge}
STEPS=${STEPS:-60}
OUT=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$OUT"

if [[ "${1:-}" == "--tiny" ]]; then
  PEAK_FLOPS=${PEAK_FLOPS:-1e11}
  device=cpu
  args=(trainer.precision=32-true model.n_layer=1 model.n_head=2 model.n_embd=32
        data.block_size=64 data.batch_size=4 data.tokenizer=bytes compile_blocks=false)
  STEPS=${TINY_STEPS:-12}
else
  # H100/H200 SXM dense bf16 peak per the data sheet; measured matmul peak on an H200 is ~790e12.
  PEAK_FLOPS=${PEAK_FLOPS:-989e12}
  device=gpu
  args=(trainer.precision=bf16-mixed model.n_layer=12 model.n_head=12 model.n_embd=768
        data.block_size=1024 data.batch_size=16 data.eval_batch_size=16 compile_blocks=true)
fi

# train_and_report <label> <extra overrides...>: one bounded run, then its figures from the CSV log.
train_and_report() {
  local label=$1 out="$OUT/$1"
  shift
  mkdir -p "$out"
  "$LMFORGE" train "${args[@]}" "$@" \
    trainer.max_steps="$STEPS" trainer.val_check_interval="$STEPS" trainer.num_sanity_val_steps=0 \
    scheduler.warmup_steps=$((STEPS / 5)) \
    trainer.log_every_n_steps=5 data.eval_windows=16 test=false logger=csv \
    callbacks.throughput.peak_flops="$PEAK_FLOPS" callbacks.throughput.window_size=5 \
    sample.max_new_tokens=8 callbacks.text_samples.max_new_tokens=8 extras.print_config=false \
    paths.log_dir="$out/logs" paths.data_dir="${DATA_DIR:-data}" > "$out/train.out" 2>&1 || { tail -50 "$out/train.out"; exit 1; }
  metrics=$(find "$out/logs" -name metrics.csv | head -1)
  "$(dirname "$LMFORGE")/python" - "$metrics" "$PEAK_FLOPS" "$label" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def last(key):
    values = [float(r[key]) for r in rows if r.get(key)]
    return values[-1] if values else float("nan")
# Under tensor parallelism a "device" is a tensor-parallel group: its processes share the tokens.
prefix = "" if sys.argv[3] == "single" else f"{sys.argv[3]} "
tokens = last("train/device/items_per_sec")
flops = last("train/device/flops_per_sec")
print(f"{prefix}tokens/s per device: {tokens:,.0f}")
print(f"{prefix}model FLOP/s per device: {flops / 1e12:.3g} TFLOP/s")
print(f"{prefix}MFU (peak {float(sys.argv[2]) / 1e12:.3g} TFLOP/s): {100 * last('train/device/mfu'):.1f}%")
PY
}

train_and_report single trainer=$device
# Tensor parallelism (trainer=tp) over 2 devices: 2 GPUs when there are, 2 CPU processes with --tiny.
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [[ "${1:-}" == "--tiny" ]]; then
  train_and_report tp2 trainer=tp trainer.devices=2 trainer.accelerator=cpu
elif (( gpus >= 2 )); then
  train_and_report tp2 trainer=tp trainer.devices=2 trainer.accelerator=gpu
else
  echo "tp2: skipped (tensor parallelism needs 2 GPUs; this machine has $gpus)"
fi
