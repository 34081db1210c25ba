"""An expert library: one directory per expert (colm/formats/expert_library.py, colm/checkpoints/library.py).

    # add a one-expert checkpoint (exp_out/<path>/best.pt, or a file) as <library>/<name>/
    python scripts/expert_library.py add exp_out/expert_library P3Socialiqa \
        --checkpoint datasets_concatenated/P3Socialiqa_t5xl_lora_inpgatetrainnogumbel
    # split a concatenated checkpoint into one entry per expert, named from the experts.json beside it,
    # else from --setting (the setting's order) or --names (in index order)
    python scripts/expert_library.py split exp_out/expert_library --checkpoint path/to/best.pt --setting Full
    # list the entries
    python scripts/expert_library.py list exp_out/expert_library

Concatenate entries (in the order listed) with scripts/concatenate.py and `run_concatenate.library="<library>"`.
Run from the repository root.
"""

import argparse
import shlex
import sys

from colm.checkpoints import library as lib
from colm.formats.expert_library import list_entries


def _command(argv) -> str:
    return shlex.join(["python", "scripts/expert_library.py"] + list(argv))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a one-expert checkpoint as an entry")
    add.add_argument("library", help="the library directory")
    add.add_argument("name", help="the entry's name (the expert's name in concatenations)")
    add.add_argument("--checkpoint", required=True, help="experiment path relative to exp_out/, or a checkpoint file")
    add.add_argument("--scope", default=None, help="the training dataset's scope (default: from the name, as settings)")
    split = commands.add_parser("split", help="one entry per expert of a concatenated checkpoint")
    split.add_argument("library", help="the library directory")
    split.add_argument("--checkpoint", required=True, help="experiment path relative to exp_out/, or a checkpoint file")
    split.add_argument("--setting", default=None, help="name experts in this setting's order (without experts.json)")
    split.add_argument("--names", nargs="+", default=None, help="the experts' names in index order")
    for sub in (add, split):
        sub.add_argument("--model_type", default=None, help="default: $MODEL_TYPE, else t5xl")
        sub.add_argument("--base_model", default=None, help="default: the model type's base model")
        sub.add_argument("--overwrite", action="store_true", help="replace existing entries")
    listing = commands.add_parser("list", help="the library's entries")
    listing.add_argument("library", help="the library directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            lib.add_to_library(args.checkpoint, args.library, args.name, args.scope, args.model_type, args.base_model,
                               _command(argv), args.overwrite)
        elif args.command == "split":
            lib.split_checkpoint(args.checkpoint, args.library, args.names, args.setting, args.model_type,
                                 args.base_model, _command(argv), args.overwrite)
        else:
            entries = list_entries(args.library)
            for m in entries:
                print(f"{m['name']}\tscope={m['scope']}\trank={m['rank']}\trouter_vectors={m['router_vectors']}\t"
                      f"gate={m.get('gate')}\tmodules={len(m['modules'])}\tbase_model={m.get('base_model')}")
            print(f"[colm] {len(entries)} entries in {args.library}")
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        print(f"[colm] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
