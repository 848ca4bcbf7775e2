"""One TiKMiX run under DeepSpeed ZeRO (through ``Trainer(deepspeed=...)``) on CPU ranks, or its reference.

    python dist_deepspeed.py OUT STAGE {probes|training} [cuda]    (under torchrun; DS_ACCELERATOR=cpu on CPU)
    python dist_deepspeed.py OUT 0 {probes|training} [cuda]         (one process, no DeepSpeed: the reference)

``cuda`` trains on the GPUs (``scripts/gpu_check.sh``); without it, on CPU ranks with gloo.

Learning rate 0, so that every measurement sees the same parameters; two ranks of 4 sequences or one of 8.
"""

import os
import sys

from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers.launch import exit_rank  # noqa: E402

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig  # noqa: E402
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation  # noqa: E402


def main(out: str, stage: int, source: str, device: str = "cpu") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {}
    if stage:
        extra["deepspeed"] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "train_batch_size": "auto", "zero_optimization": {"stage": stage}}
    args = TrainingArguments(output_dir=out, max_steps=9, per_device_train_batch_size=8 // world, learning_rate=0.0,
                             use_cpu=device == "cpu", report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                             remove_unused_columns=False, lr_scheduler_type="constant", **extra)
    mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
    probe_collator = RecordingCollator()
    probe_collator.recording = False
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0,
                          tikmix_stage_steps=8, tikmix_influence_source=source, tikmix_window_steps=4,
                          tikmix_probe_sequences=8, tikmix_probe_batch_size=4, tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probe_collator)
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=RecordingCollator(),
                      callbacks=[callback])
    callback.bind(trainer)
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
    exit_rank()
