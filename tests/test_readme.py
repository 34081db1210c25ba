"""Replays the README's embedded-default command blocks, so the README cannot rot.

A block is replayed when it runs on the embedded default (it sets MODEL_TYPE=tiny); the T5-XL blocks
document the same commands at full size.
"""

import os
import re
import subprocess
import sys

import torch

from colm.moma.weights import read_checkpoint
from colm.procedures.results import read_results

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", open(README).read(), flags=re.S)


def replay(block, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("COLM_ROOT", "EXP_NAME", "DATASET")}
    bin_dir = os.path.dirname(sys.executable)
    env.update(PYTHON_EXEC=sys.executable, COLM_NO_VENV="1", PATH=f"{bin_dir}:{env['PATH']}",
               PYTHONPATH=f"{cwd}:{env.get('PYTHONPATH', '')}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{done.stderr[-4000:]}"
    return done


def test_readme_phatgoose_sequence_runs_on_the_embedded_default(in_tmp_repo):
    block = next(b for b in bash_blocks() if "export MODEL_TYPE=tiny" in b and "run_concatenate" in b)
    replay(block, in_tmp_repo)
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
