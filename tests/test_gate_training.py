"""Stage 2 through the launchers: MoE-format expert, then gate training changes nothing but the gates."""

import pytest
import torch

from colm.formats.checkpoint_io import read_checkpoint

QUICK = "main.logging_backend=None P/TRAIN/Trainer.gradient_accumulation_factor=1 D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=32"


@pytest.mark.slow
def test_gate_training_changes_only_the_gates(in_tmp_repo, launch):
    launch("train_single_task.sh", "-exp_name", "moe_expert", "-dataset", "TOYSENTIMENT",
           "-extra_bindings", QUICK + " P/TRAIN/Trainer.num_steps=6 P/TRAIN/Trainer.validation_step_interval=3")
    expert = read_checkpoint(str(in_tmp_repo / "exp_out/moe_expert/best.pt"))
    m = "encoder.block.0.layer.1.DenseReluDense.wo"
    assert expert[f"{m}._addons.expert_lora.layer1__0"].shape == (256, 16)
    assert expert[f"{m}._addons.expert_lora.layer2__0"].shape == (16, 128)
    assert expert[f"{m}._addons.router.expert_embeddings__0"].shape == (256,)

    launch("train_gate.sh", "-exp_name", "moe_expert_gate", "-dataset", "TOYSENTIMENT",
           "-old_exp_name", "moe_expert", "-extra_bindings", QUICK + " P/TRAIN/Trainer.num_steps=5")
    gated = read_checkpoint(str(in_tmp_repo / "exp_out/moe_expert_gate/best.pt"))
    gates = [k for k in gated if k.endswith("expert_input_gate")]
    assert len(gates) == 72 and gated[f"{m}._addons.expert_lora.expert_input_gate"].shape == (256,)
    assert all(gated[k].abs().sum() > 0 for k in gates)  # trained away from the zero init
    assert set(gated) - set(gates) == set(expert)
    for key, value in expert.items():
        assert torch.equal(gated[key], value), f"gate training changed {key}"
