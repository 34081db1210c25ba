"""Prints per dataset scope: examples, input/target token lengths (mean, p50, p95, max), the fraction
truncated at max_length and the number of answer choices (logic in colm/tools/dataset_info.py).

    python scripts/get_dataset_info.py --scopes 'D/P3*/EVAL' --model_gin colm/models/t5xl/t5.gin
    python scripts/get_dataset_info.py --scopes D/TOYREVERSE/EVAL 'D/TOY*/TRAIN' --tokenizer byt5 --save

Patterns use * ? [..] (a * also crosses "/"). The gin files default to the dataset registries of $MODEL_TYPE
(colm.datasets.families: every colm/datasets/<family>.gin). Exits 1 if any dataset failed; the others are still
reported.
"""

import argparse
import os
import sys

from colm.datasets.families import registry_files
from colm.tools import dataset_info as info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scopes", nargs="+", required=True, help="dataset scopes or patterns, e.g. 'D/P3*/EVAL'")
    parser.add_argument("--gin_files", nargs="+", default=None, help="default: the dataset registries of $MODEL_TYPE")
    parser.add_argument("--gin_bindings", nargs="*", default=[])
    parser.add_argument("--model_gin", default=None,
                        help="model gin file whose M/MODEL/hf_tokenizer to use "
                             "(default: colm/models/$MODEL_TYPE/t5.gin, MODEL_TYPE defaulting to t5xl)")
    parser.add_argument("--tokenizer", default=None,
                        help="'byt5' (offline, no files) or a tokenizer path / hub name; overrides --model_gin")
    parser.add_argument("--max_examples", type=int, default=1000,
                        help="measure a random sample of this many examples per dataset (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="also write <out_dir>/<name>.json and .csv")
    parser.add_argument("--out_dir", default=info.DEFAULT_OUT_DIR)
    parser.add_argument("--name", default="dataset_info")
    args = parser.parse_args(argv)

    model_type = os.environ.get("MODEL_TYPE") or "t5xl"
    gin_files = list(args.gin_files) if args.gin_files is not None else registry_files(model_type)
    if args.tokenizer is None:
        gin_files.append(args.model_gin or f"colm/models/{model_type}/t5.gin")
    try:
        info.parse_config(gin_files, args.gin_bindings)
        tokenizer = info.load_tokenizer(args.tokenizer)
        scopes = info.select_scopes(args.scopes)
    except (OSError, ValueError) as error:  # bad files, tokenizer or patterns: nothing to measure
        print(f"{os.path.basename(__file__)}: {error}", file=sys.stderr)
        return 2
    rows = info.collect(scopes, tokenizer, max_examples=args.max_examples, seed=args.seed)
    print(info.format_table(rows))
    if args.save:
        for path in info.write_outputs(rows, args.out_dir, args.name):
            print(f"[colm] wrote {path}")
    failed = [r["scope"] for r in rows if "error" in r]
    if failed:
        print(f"[colm] {len(failed)} of {len(rows)} dataset(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
