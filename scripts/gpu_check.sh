#!/usr/bin/env bash
# GPU checks of the influence engine on a machine with one or more CUDA GPUs.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: benchmarks/out/gpu
#
# 1. benchmarks/influence_speed.py at about 100M parameters in bfloat16 on one GPU, beside Trainer steps;
# 2. the same model sharded with fully_shard over every GPU (--fsdp): influence against training tokens/s
#    and buffers per rank;
# 3. a short Trainer run whose model accelerate wraps in FSDP (FSDP2, and FSDP1 with use_orig_params), the
#    TiKMiX callback re-mixing every few steps, on every GPU present. It fails unless every stage measured
#    influence and all ranks hold the same mixture.
# 4. the training set-ups' GPU cells (docs/influence.md, "Training set-ups"), one GPU, a ~110M-parameter Llama
#    at learning rate 0: bf16 (the window's S against float32's, within bf16 precision; its peak memory against
#    a run on probes), and torch.compile with inductor (falls back to probes when training starts, with the
#    warning; S equal to the eager run's);
# 5. DeepSpeed ZeRO through Trainer(deepspeed=...), where deepspeed is installed: ZeRO-1 and ZeRO-2 measure as
#    one process does (probes and window) on every GPU present; ZeRO-3 is refused when training starts.
# Everything is written under OUT_DIR (logs, JSON, markdown); the summary is OUT_DIR/summary.md.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-"$ROOT/benchmarks/out/gpu"}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then
  echo "gpu_check.sh: no CUDA GPU visible to torch (torch.cuda.device_count() = 0); run it on a GPU machine" >&2
  exit 2
fi
{
  echo "# GPU check"
  echo
  echo "- $(date -u +%Y-%m-%dT%H:%MZ), $NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
  echo "- torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'),"\
       "transformers $("$PY" -c 'import transformers; print(transformers.__version__)'),"\
       "accelerate $("$PY" -c 'import accelerate; print(accelerate.__version__)')"
  echo
} > "$OUT/summary.md"

# About 110M parameters: 12 layers x 768 hidden (85M) plus 16k-token embeddings and head (25M).
SIZE=(--device cuda --dtype bfloat16 --hidden 768 --layers 12 --vocab 16000 --seq-len 512 --batch-size 8)

echo "== 1/5 influence speed, one GPU" >&2
"$PY" benchmarks/influence_speed.py "${SIZE[@]}" --no-accuracy --out "$OUT/influence_speed.json" \
  2>&1 | tee "$OUT/influence_speed.log"
{ echo "## Influence speed, one GPU"; echo; grep -E '^(Llama|\|)' "$OUT/influence_speed.log"; echo; } >> "$OUT/summary.md"

echo "== 2/5 influence speed, fully_shard over $NGPU GPU(s)" >&2
"$PY" benchmarks/influence_speed.py --fsdp --nproc "$NGPU" "${SIZE[@]}" --out "$OUT/influence_speed.json" \
  2>&1 | tee "$OUT/influence_speed_fsdp.log"
{ echo "## Influence speed, fully_shard over $NGPU GPU(s)"; echo; cat "$OUT/influence_speed_fsdp.md"; echo; } \
  >> "$OUT/summary.md"

echo "== 3/5 Trainer + accelerate FSDP + TiKMiX callback on $NGPU GPU(s)" >&2
cat > "$OUT/trainer_fsdp.py" <<'PY'
"""A short Trainer run with FSDP (accelerate) and the TiKMiX callback; rank 0 writes the history check."""
import json
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.cli import shutdown_distributed
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

out, version = sys.argv[1], int(sys.argv[2])
fsdp_config = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "version": version}
if version == 1:
    fsdp_config["use_orig_params"] = True
args = TrainingArguments(
    output_dir=os.path.join(out, f"fsdp{version}"), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
    report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, seed=0, bf16=True,
    remove_unused_columns=False, lr_scheduler_type="constant", fsdp="full_shard auto_wrap", fsdp_config=fsdp_config,
)
mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
probe = RecordingCollator()
probe.recording = False
callback = TiKMiXCallback(mixture, toy_validation(), TiKMiXConfig(tikmix_stage_steps=10, tikmix_show_progress=False),
                          collator=probe)
trainer = Trainer(model=toy_model(0, torch.float32), args=args, train_dataset=mixture,
                  data_collator=RecordingCollator(), callbacks=[callback])
callback.bind(trainer)
trainer.train()
wrapped = type(trainer.model_wrapped).__name__
sharded = any(type(m).__name__.startswith(("FSDP", "FullyShardedDataParallel")) for m in trainer.model_wrapped.modules())
weights = [list(entry["weights_after"].values()) for entry in callback.history]
every = [None] * torch.distributed.get_world_size() if torch.distributed.is_initialized() else [weights]
if torch.distributed.is_initialized():
    torch.distributed.all_gather_object(every, weights)
report = {"fsdp_version": version, "world_size": len(every), "wrapped": wrapped, "sharded": sharded,
          "stages": len(callback.history), "statuses": [e["status"] for e in callback.history],
          "ranks_agree": all(w == every[0] for w in every), "weights": weights}
if int(os.environ.get("RANK", "0")) == 0:
    with open(os.path.join(out, f"trainer_fsdp{version}.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps(report))
shutdown_distributed()
ok = sharded and report["stages"] >= 2 and report["ranks_agree"] and "skipped" not in report["statuses"]
sys.exit(0 if ok else 1)
PY
echo "## Trainer + accelerate FSDP + TiKMiX callback, $NGPU GPU(s)" >> "$OUT/summary.md"
echo >> "$OUT/summary.md"
status=0
for version in 2 1; do
  if "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" "$OUT/trainer_fsdp.py" "$OUT" "$version" \
      > "$OUT/trainer_fsdp$version.log" 2>&1; then
    result="passed"
  else
    result="FAILED (see trainer_fsdp$version.log)"; status=1
  fi
  echo "- FSDP$version: $result: $(cat "$OUT/trainer_fsdp$version.json" 2>/dev/null || echo 'no report')" >> "$OUT/summary.md"
done
echo "== 4/5 training set-ups on one GPU: bf16 at ~110M parameters, torch.compile (inductor)" >&2
cat > "$OUT/setups_gpu.py" <<'PY'
"""The set-ups' GPU cells at ~110M parameters, learning rate 0 (every measurement sees the same parameters)."""
import json
import sys
import warnings

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.testing import tiny_llama

out = sys.argv[1]
SEQ, VOCAB = 512, 16000
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 is float32


def rows(low, high, n, seed):
    ids = np.random.default_rng(seed).integers(low, high, size=(n, SEQ)).tolist()
    return [{"input_ids": r, "attention_mask": [1] * SEQ, "labels": r} for r in ids]


DOMAINS = {"low": rows(0, 6000, 96, 1), "mid": rows(4000, 10000, 96, 2), "high": rows(10000, 16000, 96, 3)}
VALIDATION = {"task": rows(2000, 8000, 16, 4)}


def run(name, source, **kw):
    model = tiny_llama(VOCAB, hidden_size=768, layers=12, heads=12, block_size=SEQ, seed=0)  # ~110M, tied
    mixture = DomainMixture(DOMAINS, weights="uniform", seed=3)
    config = TiKMiXConfig(tikmix_stage_steps=8, tikmix_influence_source=source, tikmix_window_steps=4,
                          tikmix_probe_sequences=16, tikmix_validation_sequences=16, tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, VALIDATION, config, collator=default_data_collator)
    args = TrainingArguments(output_dir=f"{out}/{name}", max_steps=9, per_device_train_batch_size=4,
                             learning_rate=0.0, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                             remove_unused_columns=False, lr_scheduler_type="constant", **kw)
    trainer = Trainer(model=model, args=args, train_dataset=mixture, data_collator=default_data_collator,
                      callbacks=[callback])
    callback.bind(trainer)
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    stage = callback.history[0]
    window = stage["influence"]["window"]
    return {"S": stage["influence"]["scores"], "status": stage["status"],
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "window_sequences": None if window is None else sum(window["sequences"].values()),
            "warnings": sorted({str(w.message)[:300] for w in caught if "TiKMiX" in str(w.message)})}


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


report, checks = {}, {}
for name, source, kw in [("fp32_window", "training", {}), ("bf16_window", "training", {"bf16": True}),
                         ("fp32_probes", "probes", {}), ("bf16_probes", "probes", {"bf16": True}),
                         ("compile_auto", "auto", {"torch_compile": True})]:
    report[name] = run(name, source, **kw)
    print(name, json.dumps(report[name])[:400], flush=True)
checks["bf16 window read every sequence (4 steps x 4)"] = report["bf16_window"]["window_sequences"] == 16
checks["bf16 window S within bf16 precision of float32's"] = rel(report["bf16_window"]["S"],
                                                                 report["fp32_window"]["S"]) < 0.05
checks["bf16 probes S within bf16 precision of float32's"] = rel(report["bf16_probes"]["S"],
                                                                 report["fp32_probes"]["S"]) < 0.05
checks["bf16 window peak memory within 1.5x of the run on probes"] = (
    report["bf16_window"]["peak_gb"] < 1.5 * report["bf16_probes"]["peak_gb"])
checks["compile falls back to probes when training starts, with the warning"] = (
    report["compile_auto"]["window_sequences"] is None
    and any("torch_compile=True" in w for w in report["compile_auto"]["warnings"]))
checks["compile: probes S equal to the eager run's"] = rel(report["compile_auto"]["S"],
                                                           report["fp32_probes"]["S"]) < 1e-4
report["checks"] = checks
with open(f"{out}/setups_gpu.json", "w") as fh:
    json.dump(report, fh, indent=1)
for check, ok in checks.items():
    print(("passed" if ok else "FAILED"), check)
sys.exit(0 if all(checks.values()) else 1)
PY
echo "## Training set-ups on one GPU (~110M parameters)" >> "$OUT/summary.md"
echo >> "$OUT/summary.md"
# One process on one GPU: with several visible, the Trainer would wrap the model in nn.DataParallel.
FIRST_GPU=${CUDA_VISIBLE_DEVICES:-0}
FIRST_GPU=${FIRST_GPU%%,*}
if CUDA_VISIBLE_DEVICES=$FIRST_GPU "$PY" "$OUT/setups_gpu.py" "$OUT" > "$OUT/setups_gpu.log" 2>&1; then
  echo "- all passed" >> "$OUT/summary.md"
else
  status=1
fi
grep -E '^(passed|FAILED) ' "$OUT/setups_gpu.log" | sed 's/^/- /' >> "$OUT/summary.md" || echo "- no result (see setups_gpu.log)" >> "$OUT/summary.md"
echo >> "$OUT/summary.md"

echo "== 5/5 DeepSpeed ZeRO through Trainer(deepspeed=...) on $NGPU GPU(s)" >&2
echo "## DeepSpeed ZeRO, $NGPU GPU(s)" >> "$OUT/summary.md"
echo >> "$OUT/summary.md"
if "$PY" -c "import deepspeed" > /dev/null 2>&1; then
  DS="$ROOT/tests/distributed/dist_deepspeed.py"
  for source in probes training; do
    CUDA_VISIBLE_DEVICES=$FIRST_GPU "$PY" "$DS" "$OUT/ds-one-$source" 0 "$source" cuda > "$OUT/ds-one-$source.log" 2>&1 \
      || status=1
    for stage in 1 2; do
      if "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" "$DS" "$OUT/ds-zero$stage-$source" "$stage" "$source" cuda \
          > "$OUT/ds-zero$stage-$source.log" 2>&1 \
         && "$PY" - "$OUT/ds-one-$source" "$OUT/ds-zero$stage-$source" <<'PY'
import json
import sys

import numpy as np

one, zero = (json.load(open(f"{d}/tikmix/history.json"))["stages"][0]["influence"]["scores"] for d in sys.argv[1:])
sys.exit(0 if np.allclose(zero, one, rtol=1e-3, atol=1e-6) else 1)
PY
      then
        echo "- ZeRO-$stage, $source: passed (S as one process)" >> "$OUT/summary.md"
      else
        echo "- ZeRO-$stage, $source: FAILED (see ds-zero$stage-$source.log)" >> "$OUT/summary.md"; status=1
      fi
    done
  done
  if "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" "$DS" "$OUT/ds-zero3" 3 probes cuda > "$OUT/ds-zero3.log" 2>&1; then
    echo "- ZeRO-3: FAILED (trained; it should have been refused when training started)" >> "$OUT/summary.md"; status=1
  elif grep -q "DeepSpeed ZeRO-3 partitions every parameter" "$OUT/ds-zero3.log"; then
    echo "- ZeRO-3: passed (refused when training started, with the message)" >> "$OUT/summary.md"
  else
    echo "- ZeRO-3: FAILED (failed without the refusal message; see ds-zero3.log)" >> "$OUT/summary.md"; status=1
  fi
else
  echo "- skipped: deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed==0.19.8 --no-build-isolation)" >> "$OUT/summary.md"
fi

cat "$OUT/summary.md"
exit $status
