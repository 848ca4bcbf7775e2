"""TrustRegionDecider: the default TiKMiX-D decision without a Trainer reproduces the callback's, stage by stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import Trainer, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig, TrustRegionDecider, load_history
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation


def test_a_custom_loop_gets_the_callbacks_decisions(tmp_path):
    mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
    config = TiKMiXConfig(tikmix_stage_steps=6, tikmix_max_epochs=None, tikmix_preconditioner="adam",
                          tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, toy_validation(), config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=8,
                             learning_rate=3e-3, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False, lr_scheduler_type="constant")
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=RecordingCollator())
    callback.bind(trainer)
    trainer.train()
    stages = load_history(tmp_path / "tikmix" / "history.json")["stages"]
    assert len(stages) == 3

    decider = TrustRegionDecider()  # the library's defaults
    for stage in stages:
        influence, trust = stage["influence"], stage["mixer"]["trust_region"]
        domains, tasks = influence["domain_names"], influence["task_names"]
        answer = decider.decide(np.array(influence["scores"]), [stage["weights_before"][d] for d in domains],
                                stderr=np.array(influence["stderr"], dtype=float),
                                task_losses=[influence["task_losses"][t] for t in tasks], step=trust["step_length"],
                                domains=domains, tasks=tasks)
        np.testing.assert_allclose(answer.weights, [stage["weights_after"][d] for d in domains], rtol=0, atol=1e-12)
        assert decider.last["controller"]["radius_used"] == pytest.approx(trust["radius_used"], rel=1e-12)
    # its state is JSON, and a decider restored from it decides as the original does
    state = json.loads(json.dumps(decider.state_dict()))
    restored = TrustRegionDecider()
    restored.load_state_dict(state)
    S, prior = np.array([[1.0, -0.5, 0.2]]), np.array([0.3, 0.3, 0.4])
    kwargs = dict(stderr=np.full((1, 3), 0.1), task_losses=[3.0], step=0.1, domains=domains, tasks=["t"])
    expected = decider.decide(S, prior, **kwargs).weights
    np.testing.assert_array_equal(restored.decide(S, prior, **kwargs).weights, expected)


def test_without_information_the_decider_keeps_the_prior_and_bad_settings_name_themselves():
    decider = TrustRegionDecider()
    prior = np.array([0.5, 0.3, 0.2])
    answer = decider.decide(np.zeros((2, 3)), prior, task_losses=[1.0, 2.0])
    np.testing.assert_array_equal(answer.weights, prior)
    assert answer.status == "fallback"
    with pytest.raises(ValueError, match="smoothing=1.0"):
        TrustRegionDecider(smoothing=1.0)
    with pytest.raises(ValueError, match="shrink_z=-1"):
        TrustRegionDecider(shrink_z=-1)
    with pytest.raises(ValueError, match="unknown state"):
        decider.load_state_dict({"radius": 1})
