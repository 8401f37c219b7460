#!/usr/bin/env bash
# Validate the CUDA path on one GPU: launcher on nccl, the allocator's counters against memprof's
# categories and the estimate, profiler cost on CUDA. Writes everything under ${OUT:-gpu-out}/.
#
#   bash benchmarks/gpu_validate.sh [MODEL] [SEQ]        (default: gpt2 512)
#   PART=launch: launches + compare + CUDA tests only; PART=bench: the profiler benchmarks only
#   LLAMA_MODEL (default tinyllama-1.1b), LLAMA_SEQ (default 1024): the Llama-family launches
#   (bf16: CUDA sdpa flash with GQA, the fp32 logits upcast at a 32k vocabulary); LLAMA_MODEL=none skips them
#   FSDP2_MODEL (default MODEL): FSDP2 runs (benchmarks/fsdp2_gpu_loop.py), 1 rank; FSDP2_MODEL=none skips them
#
# Needs deepspeed importable; FusedAdam JIT-builds once, for this GPU's compute capability.
set -uo pipefail
MODEL=${1:-gpt2}
SEQ=${2:-512}
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT/runs"
# DeepSpeed 0.19.8's op builder cannot parse entries such as "9.0a": build for this GPU's plain capability
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST_OVERRIDE:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
} 2>&1 | grep -v "^\[" | tee "$OUT/env.txt"

if [ "${PART:-all}" != bench ]; then
for cfg in stage0_adamw stage0_sgd stage1_adamw_bf16 stage2_adamw stage2_adamw_bf16 stage3_adamw_bf16; do
  echo "== $cfg" | tee -a "$OUT/launch.log"
  start=$(date +%s)
  timeout 300 $PY -m deepspeed.launcher.runner --num_gpus 1 launch/train.py \
      --deepspeed_config "configs/$cfg.json" --model "$MODEL" --steps 4 --seq-len "$SEQ" \
      --out "$OUT/runs/$cfg" >> "$OUT/launch.log" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/launch.log"
  $PY -m memprof compare "$OUT/runs/$cfg" --json > "$OUT/runs/$cfg/compare.json" 2>> "$OUT/launch.log"
  $PY -m memprof compare "$OUT/runs/$cfg" 2>&1 | tail -40 >> "$OUT/compare.txt"
done

LLAMA_MODEL=${LLAMA_MODEL:-tinyllama-1.1b}
LLAMA_SEQ=${LLAMA_SEQ:-1024}
if [ "$LLAMA_MODEL" != none ]; then
for cfg in stage2_adamw_bf16 stage3_adamw_bf16; do
  run="llama_$cfg"
  echo "== $run ($LLAMA_MODEL, seq $LLAMA_SEQ)" | tee -a "$OUT/launch.log"
  start=$(date +%s)
  timeout 600 $PY -m deepspeed.launcher.runner --num_gpus 1 launch/train.py \
      --deepspeed_config "configs/$cfg.json" --model "$LLAMA_MODEL" --steps 4 --seq-len "$LLAMA_SEQ" \
      --out "$OUT/runs/$run" >> "$OUT/launch.log" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/launch.log"
  $PY -m memprof compare "$OUT/runs/$run" --json > "$OUT/runs/$run/compare.json" 2>> "$OUT/launch.log"
  $PY -m memprof compare "$OUT/runs/$run" 2>&1 | tail -40 >> "$OUT/compare.txt"
done
fi

# FSDP2 (torch fully_shard) on the one GPU: a 1-rank nccl group per setup under MemoryProfiler, then
# accelerate's FSDP plugin (fsdp_version: 2) under profile_accelerate; memprof compare as above
# (allocator counters vs categories vs the --engine fsdp2 estimate). FSDP2_MODEL=none skips them.
FSDP2_MODEL=${FSDP2_MODEL:-$MODEL}
if [ "$FSDP2_MODEL" != none ]; then
for setup in reshard keep bf16 offload lora; do
  echo "== fsdp2_$setup ($FSDP2_MODEL, seq $SEQ)" | tee -a "$OUT/launch.log"
  start=$(date +%s)
  timeout 300 $PY -m torch.distributed.run --nproc_per_node 1 benchmarks/fsdp2_gpu_loop.py \
      "$OUT/runs/fsdp2" "$setup" "$FSDP2_MODEL" "$SEQ" >> "$OUT/launch.log" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/launch.log"
  $PY -m memprof compare "$OUT/runs/fsdp2/$setup" --json > "$OUT/runs/fsdp2/$setup/compare.json" 2>> "$OUT/launch.log"
  $PY -m memprof compare "$OUT/runs/fsdp2/$setup" 2>&1 | tail -40 >> "$OUT/compare.txt"
done
case "$FSDP2_MODEL" in gpt2*) BLOCK=GPT2Block ;; *) BLOCK=LlamaDecoderLayer ;; esac
cat > "$OUT/fsdp2_accelerate.yaml" <<YAML
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 1
num_machines: 1
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: $BLOCK
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
YAML
echo "== fsdp2_accelerate ($FSDP2_MODEL, seq $SEQ)" | tee -a "$OUT/launch.log"
start=$(date +%s)
timeout 300 $PY -m accelerate.commands.launch --config_file "$OUT/fsdp2_accelerate.yaml" benchmarks/fsdp2_gpu_loop.py \
    "$OUT/runs/fsdp2" accelerate "$FSDP2_MODEL" "$SEQ" >> "$OUT/launch.log" 2>&1
echo "rc=$? seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/launch.log"
$PY -m memprof compare "$OUT/runs/fsdp2/accelerate" --json > "$OUT/runs/fsdp2/accelerate/compare.json" 2>> "$OUT/launch.log"
$PY -m memprof compare "$OUT/runs/fsdp2/accelerate" 2>&1 | tail -40 >> "$OUT/compare.txt"
fi

$PY -m pytest -q tests/test_profiler_cuda.py 2>&1 | tail -3 | tee "$OUT/pytest_cuda.txt"
tar czf "$OUT/runs.tgz" -C "$OUT" runs && rm -rf "$OUT/runs"
fi
[ "${PART:-all}" = launch ] && exit 0
$PY benchmarks/bench_profiler.py --device cuda --rounds 5 --steps 5 --layers 12 --hidden 768 --batch 8 --seq 1024 2>&1 | tail -12 | tee "$OUT/bench_cuda.txt"
$PY benchmarks/bench_profiler.py --device cpu --threads 2 --rounds 5 --steps 3 2>&1 | tail -12 | tee "$OUT/bench_cpu.txt"
