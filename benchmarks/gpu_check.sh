#!/usr/bin/env bash
# GPU check (SPEC §8, issues 5 and 14), one call, < 10 minutes on one H100/H200:
#  1. mpma_base bf16 training step on ONE GPU under ZeRO-3 (ds_configs/zero3_bf16.json) in four settings:
#     {today: kernel_impl=reference, fixed padding, no compile | kernels: kernel_impl=auto (Triton), dynamic
#     padding, train.compile} x {activation checkpointing on | off} -> samples/s, MFU against 989 TFLOP/s
#     (dense bf16), peak GPU memory. One plain process per setting (`python launch/pretrain.py`, NCCL group of
#     one), synthetic in-memory batches (the step is measured, not the loader), MLflow off.
#  2. JPEG decode images/s of 512 px shard JPEGs: DALI `mixed` (nvJPEG) and torchvision.io.decode_jpeg(cuda).
#  3. the DALI loader's samples/s (mixed decode, 288 px, train transforms) vs the step's samples/s.
#
# On the lent GPU machine (../shared/device/README.md), after installing the carried wheels (and DALI):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_check.sh
# Budget: 4 runs x <= 110 s (start-up, compile, STEPS steps of batch 32 at 288 px) + ~1.5 min of decode and
# loader. Prints a table last; logs and gpu_check.json go to $OUT (default benchmarks/results/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu_check}"
MICRO="${MICRO:-32}"
STEPS="${STEPS:-15}"
RUN_TIMEOUT="${RUN_TIMEOUT:-110}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"

# Shards at the SPEC's 512 px from a small synthetic corpus, and a WordPiece tokenizer trained on them.
"$PY" - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
from data_tools.build_shards import build_shards
from data_tools.synth.corpus import generate_corpus
from data_tools.train_tokenizer import train_tokenizer
work = Path(sys.argv[1])
generate_corpus(work / "corpus", 96, 1, min_size=520, max_size=640)
build_shards("mimic-cxr", work / "corpus", work / "shards", shard_size=64, image_size=512, progress=False)
train_tokenizer(work / "shards", work / "tok", 2048, min_frequency=1)
PYEOF

# name kernel_impl compile dynamic_padding checkpointing
SETTINGS="today-ckpt:reference:false:false:true today-nockpt:reference:false:false:false
kernels-ckpt:auto:true:true:true kernels-nockpt:auto:true:true:false"
for setting in $SETTINGS; do
    IFS=: read -r name impl compile dynamic ckpt <<< "$setting"
    echo "== mpma_base, ZeRO-3 bf16, micro-batch $MICRO: $name (kernel_impl=$impl compile=$compile dynamic_padding=$dynamic checkpointing=$ckpt)"
    timeout "$RUN_TIMEOUT" "$PY" launch/pretrain.py --config launch/configs/pretrain_base.yaml \
        --set data.backend=synthetic --set data.tokenizer="$WORK/tok" --set data.synthetic_samples=2048 \
        --set model.overrides.kernel_impl="$impl" --set train.compile="$compile" \
        --set data.dynamic_padding="$dynamic" --set train.grad_checkpointing="$ckpt" \
        --set train.micro_batch_size="$MICRO" --set train.global_batch_size="$MICRO" \
        --set train.max_steps="$STEPS" --set train.warmup_steps=5 --set train.log_every=1 \
        --set train.eval_every=0 --set train.save_every=0 --set train.keep_last=1 \
        --set train.output_dir="$WORK/run-$name" --set tracking.enabled=false \
        > "$OUT/log-$name.txt" 2>&1 || echo "run $name failed or timed out (see $OUT/log-$name.txt)"
    cp "$WORK/run-$name/metrics.jsonl" "$OUT/metrics-$name.jsonl" 2>/dev/null || true
done

echo "== JPEG decode of 512 px shard JPEGs"
timeout 90 "$PY" benchmarks/bench_decode.py "$WORK/shards" --device mixed --batch 128 --seconds 10 \
    > "$OUT/decode.json" 2> "$OUT/log-decode.txt" || echo "decode benchmark failed (see $OUT/log-decode.txt)"

echo "== DALI loader (mixed decode, 288 px, train transforms, batch $MICRO)"
timeout 120 "$PY" - "$WORK" "$MICRO" > "$OUT/loader.json" 2> "$OUT/log-loader.txt" <<'PYEOF' || echo "loader benchmark failed (see $OUT/log-loader.txt)"
import json, sys, time
from pathlib import Path
from mpma_ds import load_tokenizer
from mpma_ds.data import DataConfig, build_loader
work, batch = Path(sys.argv[1]), int(sys.argv[2])
cfg = DataConfig(backend="dali", train_shards=str(work / "shards" / "train"), tokenizer=str(work / "tok"),
                 image_size=288, num_workers=4, dali_decode="mixed", dynamic_padding=True)
info = build_loader(cfg, 0, 1, batch_size=batch, seed=0, train=True)
it = iter(info.loader)
for _ in range(3):
    next(it)  # warm-up
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 15:
    next(it)
    n += batch
print(json.dumps({"loader_samples_s": n / (time.perf_counter() - t0), "threads": 4, "image_size": 288}))
info.close()
PYEOF

"$PY" - "$OUT" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
names = ("today-ckpt", "today-nockpt", "kernels-ckpt", "kernels-nockpt")
rows = {}
for name in names:
    path = out / f"metrics-{name}.jsonl"
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    steady = [r for r in recs if "samples_per_s" in r and r["step"] > 5]  # after warm-up / compile / autotune
    if not steady:
        rows[name] = None
        continue
    r = rows[name] = {
        "samples_per_s": statistics.median(x["samples_per_s"] for x in steady),
        "mfu": statistics.median(x["mfu"] for x in steady),
        "model_tflops": statistics.median(x["model_flops_per_s"] for x in steady) / 1e12,
        "peak_memory_gb": max(x["memory_gb"] for x in steady),
        "data_wait_frac": statistics.median(x["data_wait_frac"] for x in steady),
        "final_loss": steady[-1]["loss"],
    }
    # the synthetic batches are drawn in the training process: also give the step alone (wait excluded)
    busy = max(1.0 - r["data_wait_frac"], 1e-6)
    r["step_samples_per_s"], r["step_mfu"] = r["samples_per_s"] / busy, r["mfu"] / busy


def read(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


decode, loader = read("decode.json"), read("loader.json")
device = (out / "device.txt").read_text().strip()
(out / "gpu_check.json").write_text(json.dumps({"device": device, "runs": rows, "decode": decode,
                                                "loader": loader}, indent=1))
print(f"\n{device}; mpma_base bf16 ZeRO-3, 1 GPU, micro-batch from MICRO; MFU against 989 TFLOP/s dense bf16")
print(f"{'setting':<15} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'data wait':>10} "
      f"{'step-only smp/s':>16} {'step-only MFU':>14}")
for name in names:
    r = rows[name]
    if r is None:
        print(f"{name:<15} {'failed':>10}")
        continue
    print(f"{name:<15} {r['samples_per_s']:>10.1f} {r['model_tflops']:>8.1f} {r['mfu']:>6.1%} "
          f"{r['peak_memory_gb']:>9.1f} {r['data_wait_frac']:>10.1%} {r['step_samples_per_s']:>16.1f} "
          f"{r['step_mfu']:>14.1%}")
for ckpt in ("ckpt", "nockpt"):
    a, b = rows.get(f"today-{ckpt}"), rows.get(f"kernels-{ckpt}")
    if a and b:
        print(f"kernels+compile vs today ({ckpt}): speed x{b['samples_per_s'] / a['samples_per_s']:.2f}, "
              f"memory x{b['peak_memory_gb'] / a['peak_memory_gb']:.2f}")
if decode:
    print(f"decode 512 px JPEGs ({decode['images']} images, {decode['mean_kB']:.0f} kB): DALI mixed "
          f"{decode.get('dali_mixed_img_s') or 0:.0f} img/s, torchvision cuda {decode.get('torchvision_cuda_img_s', 0):.0f} img/s"
          + (f" ({decode['dali_error']})" if decode.get("dali_error") else ""))
best = max((r["step_samples_per_s"] for r in rows.values() if r), default=None)
if loader and best:
    print(f"DALI loader {loader['loader_samples_s']:.0f} samples/s vs fastest step {best:.0f} samples/s: "
          f"x{loader['loader_samples_s'] / best:.2f} (> 1: the loader keeps up)")
PYEOF
