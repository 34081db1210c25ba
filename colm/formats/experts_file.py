"""`experts.json`: the names of a concatenated checkpoint's experts, in index order (no gin, no torch).

run_concatenate writes it beside the concatenated `best.pt`; analyses read it to label experts by name and to
find each evaluated dataset's own expert (by scope).

    {"experts": [{"index": 0, "name": "P3Agnews", "scope": "P3AGNEWS"}, ...]}
"""

import json
import os

from colm.formats.layout import EXPERTS_FILE
from colm.utils.atomic import atomic_path


def write_experts_file(directory: str, setting) -> str:
    """Writes `<directory>/experts.json` from an ordered {expert name: dataset scope stem}
    (a setting); returns its path."""
    path = os.path.join(directory, EXPERTS_FILE)
    entries = [{"index": i, "name": name, "scope": scope} for i, (name, scope) in enumerate(setting.items())]
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump({"experts": entries}, f, indent=1)
    return path


def read_experts_file(path: str) -> list:
    """[{"index", "name", "scope"}, ...] in index order."""
    try:
        with open(path) as f:
            entries = json.load(f)["experts"]
        names = [str(e["name"]) for e in entries]
        scopes = [e.get("scope") for e in entries]
        indices = [int(e["index"]) for e in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not an experts file ({{\"experts\": [{{\"index\", \"name\", \"scope\"}}, "
                         f"...]}}, written by run_concatenate): {error}") from error
    if indices != list(range(len(entries))):
        raise ValueError(f"{path}: expert indices must be 0..{len(entries) - 1} in order, got {indices[:8]}...")
    return [{"index": i, "name": n, "scope": s} for i, n, s in zip(indices, names, scopes)]
