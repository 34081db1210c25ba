"""`python tests/kill_runner.py --gin_files ... --gin_bindings ...`: colm.main with fault injection, for
tests/test_resume.py (not a test module itself). Environment:

- COLM_TEST_KILL_AT_STEP=N: the process SIGKILLs itself when training is about to take step N+1 (mid-run);
- COLM_TEST_KILL_IN_SAVE=N: at the N-th write of a resume.pt it truncates the temporary file to half and
  SIGKILLs itself before the rename (mid-save);
- COLM_TEST_DROPOUT=p: every dropout of the model gets probability p, so the torch RNG matters to the result.
"""

import os
import signal
import sys


def _kill_now():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_faults(environ=os.environ):
    from colm.models import hf_loading
    from colm.procedures import trainer

    if environ.get("COLM_TEST_KILL_AT_STEP"):
        at = int(environ["COLM_TEST_KILL_AT_STEP"])
        original_step = trainer.Trainer.train_step

        def train_step(self, batches):
            if self.state["step"] == at:
                print(f"[kill_runner] SIGKILL at step {at}", flush=True)
                _kill_now()
            return original_step(self, batches)

        trainer.Trainer.train_step = train_step

    if environ.get("COLM_TEST_KILL_IN_SAVE"):
        at, seen = int(environ["COLM_TEST_KILL_IN_SAVE"]), []
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith("resume.pt"):
                seen.append(dst)
                if len(seen) == at:
                    with open(src, "r+b") as f:
                        f.truncate(os.path.getsize(src) // 2)
                    print(f"[kill_runner] SIGKILL while saving {dst}", flush=True)
                    _kill_now()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace

    if environ.get("COLM_TEST_DROPOUT"):
        p = float(environ["COLM_TEST_DROPOUT"])
        original_load = hf_loading._load

        def load(loader, name_or_path, what):
            loaded = original_load(loader, name_or_path, what)
            if what == "model":
                import torch

                for module in loaded.modules():
                    if isinstance(module, torch.nn.Dropout):
                        module.p = p
            return loaded

        hf_loading._load = load


if __name__ == "__main__":
    install_faults()
    from colm.main import cli

    sys.exit(cli(sys.argv[1:]))
