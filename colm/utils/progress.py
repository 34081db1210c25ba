"""Progress bars that draw only on a terminal.

On a terminal a bar redraws itself in place; written to a file (a launcher's log, a CI log) every redraw
is one more carriage-return frame. So when stderr is not a terminal the bars are off, ours and those of
transformers, huggingface_hub and datasets, and the procedures print plain lines instead.
"""

import os
import sys

from tqdm.auto import tqdm

# The variables the Hugging Face libraries read (at import) to turn their bars off.
HF_PROGRESS_VARIABLES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
_TRUE = ("1", "ON", "YES", "TRUE")


def interactive(stream=None) -> bool:
    """Whether `stream` (default: stderr, where bars draw) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable=None, **kwargs):
    """tqdm that draws only on a terminal; an explicit disable= still wins."""
    kwargs.setdefault("disable", not interactive())
    return tqdm(iterable, **kwargs)


def quiet_library_bars() -> bool:
    """Turns off the Hugging Face libraries' own bars when stderr is not a terminal; True if it did.

    Sets their environment variables (for libraries imported later; a value the user set, such as 0, is
    kept and obeyed) and switches off the libraries already imported.
    """
    if interactive():
        return False
    hub, datasets_var = (os.environ.setdefault(name, "1").upper() in _TRUE for name in HF_PROGRESS_VARIABLES)
    if hub and "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if hub and "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if datasets_var and "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars as disable_datasets_bars

        disable_datasets_bars()
    return True
