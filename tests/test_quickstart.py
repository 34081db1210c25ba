"""The main job on the embedded default, reduced: every stage through the launchers, then the table."""

import subprocess
import sys

import pytest
from conftest import subprocess_env

from colm.quickstart import METHOD_DIRS, Budget


def run_quickstart(cwd):
    done = subprocess.run([sys.executable, "-m", "colm.quickstart", "--fast"], cwd=cwd, env=subprocess_env(cwd),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_fast_quickstart_writes_the_method_table_and_skips_finished_stages(in_tmp_repo):
    out = in_tmp_repo / "exp_out/quickstart_fast"
    run_quickstart(in_tmp_repo)
    table = (out / "results.md").read_text()
    for method in list(METHOD_DIRS) + ["Oracle (own expert)"]:
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        assert row.count("|") == 4 + len(Budget.fast().held_in) + len(Budget.fast().held_out), row
    for name in Budget.fast().held_in:
        assert f"| {name} | " in table  # routing accuracy row
    assert (out / "phatgoose/routing_distribution/D_TOYREVERSE_EVAL.png").is_file()

    again = run_quickstart(in_tmp_repo)
    assert again.count("done before, skipped") == again.count("[quickstart] ") - 1  # all but the total line
    assert (out / "results.md").read_text() == table
