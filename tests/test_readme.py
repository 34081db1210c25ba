"""Replays the README's embedded-default command blocks, so the README cannot rot.

A block is replayed when it runs on the embedded default (it sets MODEL_TYPE=tiny); the T5-XL blocks
document the same commands at full size.
"""

import os
import re
import subprocess

import torch
from conftest import subprocess_env

from colm.moma.weights import read_checkpoint
from colm.procedures.results import read_results

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", open(README).read(), flags=re.S)


def replay(block, cwd):
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=subprocess_env(cwd),
                          capture_output=True, text=True)
    assert done.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{done.stderr[-4000:]}"
    return done


def test_readme_phatgoose_sequence_and_baselines_run_on_the_embedded_default(in_tmp_repo):
    toy_blocks = [b for b in bash_blocks() if "export MODEL_TYPE=tiny" in b]
    assert len(toy_blocks) == 2, "the README has a toy PHATGOOSE block and a toy baselines block"
    replay(toy_blocks[0], in_tmp_repo)
    out = in_tmp_repo / "exp_out/ToyA2inpgatetrainnogumbel_tiny_lora_concatenated"
    state = read_checkpoint(str(out / "best.pt"))
    m = "encoder.block.0.layer.0.SelfAttention.q"
    for i in range(3):
        assert f"{m}._addons.expert_lora.layer1__{i}" in state and f"{m}._addons.router.expert_embeddings__{i}" in state
    assert not any("input_gate" in k for k in state)
    # the router vectors are the trained gates, in the setting's order
    gate = read_checkpoint(str(in_tmp_repo / "exp_out/datasets_concatenated/ToyFirstletterclass_tiny_lora_inpgatetrainnogumbel/best.pt"))
    assert torch.equal(state[f"{m}._addons.router.expert_embeddings__1"], gate[f"{m}._addons.expert_lora.expert_input_gate"])
    results = read_results(str(out / "results.txt"))[-1][1]
    assert set(results) >= {"D/TOYCONTAINSA/EVAL", "D/TOYFIRSTLETTERCLASS/EVAL", "D/TOYLENGTHPARITY/EVAL", "average_score"}
    for name in ("D_TOYCONTAINSA_EVAL.pickle", "D_TOYCONTAINSA_EVAL.png"):
        assert (out / "routing_distribution" / name).is_file()
    assert (out / "output_text/D_TOYLENGTHPARITY_EVAL.json").is_file()

    replay(toy_blocks[1], in_tmp_repo)
    toy3 = {"D/TOYCONTAINSA/EVAL", "D/TOYFIRSTLETTERCLASS/EVAL", "D/TOYLENGTHPARITY/EVAL"}
    for exp in ("ToyCompleteA2_tiny_lora_concatenated", "ToyParameteravg_tiny_lora_outerproduct",
                "ToyArrow_tiny_lora_concatenated", "ToyCompleteansretrieval_tiny_lora_concatenated",
                "datasets_concatenated/ToyMultitask_tiny_lora"):
        results = read_results(str(in_tmp_repo / "exp_out" / exp / "results.txt"))[-1][1]
        assert toy3 <= set(results), exp
    single = read_results(str(in_tmp_repo / "exp_out/datasets_concatenated/ToyContainsa_tiny_lora/results.txt"))
    assert "D/TOYCONTAINSA/EVAL" in single[-1][1]
    # Average activation wrote each expert's router vectors before concatenation.
    avg = read_checkpoint(str(in_tmp_repo / "exp_out/ToyCompleteA2_tiny_lora_concatenated/best.pt"))
    assert all(avg[f"{m}._addons.router.expert_embeddings__{i}"].abs().sum() > 0 for i in range(3))
    merged = read_checkpoint(str(in_tmp_repo / "exp_out/ToyParameteravg_tiny_lora_outerproduct/best.pt"))
    assert merged[f"{m}._addons.expert_lora.layer1__0"].shape == (64, 3 * 16)
