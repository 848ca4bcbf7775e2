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

echo "== 1/3 influence speed, one GPU" >&2
"$PY" benchmarks/influence_speed.py "${SIZE[@]}" --no-accuracy --out "$OUT/influence_speed.json" \
  2>&1 | tee "$OUT/influence_speed.log"
{ echo "## Influence speed, one GPU"; echo; grep -E '^(Llama|\|)' "$OUT/influence_speed.log"; echo; } >> "$OUT/summary.md"

echo "== 2/3 influence speed, fully_shard over $NGPU GPU(s)" >&2
"$PY" benchmarks/influence_speed.py --fsdp --nproc "$NGPU" "${SIZE[@]}" --out "$OUT/influence_speed.json" \
  2>&1 | tee "$OUT/influence_speed_fsdp.log"
{ echo "## Influence speed, fully_shard over $NGPU GPU(s)"; echo; cat "$OUT/influence_speed_fsdp.md"; echo; } \
  >> "$OUT/summary.md"

echo "== 3/3 Trainer + accelerate FSDP + TiKMiX callback on $NGPU GPU(s)" >&2
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
cat "$OUT/summary.md"
exit $status
