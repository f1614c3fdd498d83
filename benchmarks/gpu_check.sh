#!/usr/bin/env bash
# GPU check (SPEC §8, issue 5): the base model's bf16 training step on ONE GPU under ZeRO-3
# (ds_configs/zero3_bf16.json), activation checkpointing on vs off -> samples/s, MFU against 989 TFLOP/s
# (dense bf16, H100/H200), peak GPU memory. One plain process per setting (`python launch/pretrain.py`,
# NCCL group of one), synthetic in-memory batches (the step is measured, not the loader), MLflow off.
#
# On the lent GPU machine (see ../shared/device/README.md), after installing the carried wheels:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_check.sh
# Budget: ~2 x 3 min (start-up, 30 steps of batch 32 at 288 px, the final checkpoint), within 10 minutes.
# Prints a table last; full logs and gpu_check.json go to $OUT (default benchmarks/results/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu_check}"
MICRO="${MICRO:-32}"
STEPS="${STEPS:-30}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"

# A WordPiece tokenizer from a tiny synthetic corpus (fits mpma_base's 50265-token vocabulary).
"$PY" - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
from data_tools.build_shards import build_shards
from data_tools.synth.corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer
work = Path(sys.argv[1])
generate_corpus(work / "corpus", 24, 1, min_size=96, max_size=128)
build_shards("mimic-cxr", work / "corpus", work / "shards", shard_size=64, image_size=64, progress=False)
train_tokenizer(work / "shards", work / "tok", 2048, min_frequency=1)
PYEOF

for ckpt in true false; do
    echo "== mpma_base, ZeRO-3 bf16, micro-batch $MICRO, activation checkpointing $ckpt"
    timeout 280 "$PY" launch/pretrain.py --config launch/configs/pretrain_base.yaml \
        --set data.backend=synthetic --set data.tokenizer="$WORK/tok" --set data.synthetic_samples=2048 \
        --set train.grad_checkpointing=$ckpt \
        --set train.micro_batch_size="$MICRO" --set train.global_batch_size="$MICRO" \
        --set train.max_steps="$STEPS" --set train.warmup_steps=5 --set train.log_every=1 \
        --set train.eval_every=0 --set train.save_every=0 --set train.keep_last=1 \
        --set train.output_dir="$WORK/run-ckpt-$ckpt" --set tracking.enabled=false \
        > "$OUT/log-ckpt-$ckpt.txt" 2>&1 || echo "run with checkpointing=$ckpt failed (see $OUT/log-ckpt-$ckpt.txt)"
    cp "$WORK/run-ckpt-$ckpt/metrics.jsonl" "$OUT/metrics-ckpt-$ckpt.jsonl" 2>/dev/null || true
done

"$PY" - "$OUT" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for ckpt in ("true", "false"):
    path = out / f"metrics-ckpt-{ckpt}.jsonl"
    if not path.exists():
        rows[ckpt] = None
        continue
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    steady = [r for r in recs if "samples_per_s" in r and r["step"] > 5]  # after warm-up / autotuning
    rows[ckpt] = {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "model_tflops": statistics.median(r["model_flops_per_s"] for r in steady) / 1e12,
        "peak_memory_gb": max(r["memory_gb"] for r in steady),
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in steady),
        "final_loss": steady[-1]["loss"],
    }
    # the synthetic batches are drawn in the training process: also give the step alone (wait excluded)
    busy = 1.0 - rows[ckpt]["data_wait_frac"]
    rows[ckpt]["step_samples_per_s"] = rows[ckpt]["samples_per_s"] / max(busy, 1e-6)
    rows[ckpt]["step_mfu"] = rows[ckpt]["mfu"] / max(busy, 1e-6)
device = (out / "device.txt").read_text().strip()
(out / "gpu_check.json").write_text(json.dumps({"device": device, "runs": rows}, indent=1))
print(f"\n{device}; mpma_base bf16 ZeRO-3, 1 GPU; MFU against 989 TFLOP/s dense bf16")
print(f"{'act. ckpt':<10} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'data wait':>10} "
      f"{'step-only samples/s':>20} {'step-only MFU':>14}")
for ckpt, r in rows.items():
    if r is None:
        print(f"{ckpt:<10} {'failed':>10}")
        continue
    print(f"{ckpt:<10} {r['samples_per_s']:>10.1f} {r['model_tflops']:>8.1f} {r['mfu']:>6.1%} "
          f"{r['peak_memory_gb']:>9.1f} {r['data_wait_frac']:>10.1%} {r['step_samples_per_s']:>20.1f} "
          f"{r['step_mfu']:>14.1%}")
if rows.get("true") and rows.get("false"):
    print(f"checkpointing on/off: speed x{rows['true']['samples_per_s'] / rows['false']['samples_per_s']:.2f}, "
          f"memory x{rows['true']['peak_memory_gb'] / rows['false']['peak_memory_gb']:.2f}")
PYEOF
