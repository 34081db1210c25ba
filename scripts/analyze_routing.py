"""Routing diagnosis of an evaluation (colm/procedures/routing_analysis.py).

    python scripts/analyze_routing.py exp_out/<exp_name>/routing_distribution \
        [--checkpoint exp_out/<exp_name>/best.pt | --no_checkpoint] [--experts exp_out/<exp_name>/experts.json] \
        [--own_expert D/TOYREVERSE/EVAL=ToyReverse ...] [--out_dir DIR] [--collapse_threshold 0.8]

The routing directory is what `P/EVALUATE/Evaluator.analysis_processors=[@RoutingDistribution()]` writes.
By default the checkpoint and experts.json beside it (exp_out/<exp_name>/) are used when present, each
dataset's own expert is the expert whose scope matches the dataset (D/TOYREVERSE/EVAL -> TOYREVERSE), and the
outputs go to <routing dir>/diagnosis/: routing_diagnosis.json, routing_diagnosis.md,
task_by_expert_encoder.png, task_by_expert_decoder.png.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_own_expert(pairs):
    mapping = {}
    for pair in pairs or []:
        dataset, sep, expert = pair.rpartition("=")
        if not sep or not dataset or not expert:
            raise ValueError(f"--own_expert {pair!r}: write DATASET=EXPERT, e.g. D/TOYREVERSE/EVAL=ToyReverse "
                             "(an expert name or index).")
        mapping[dataset] = expert
    return mapping


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("routing_dir", help="an evaluation's routing output, exp_out/<exp_name>/routing_distribution")
    parser.add_argument("--checkpoint", default=None, help="checkpoint with the router vectors (default: "
                        "<routing_dir>/../best.pt when present)")
    parser.add_argument("--no_checkpoint", action="store_true", help="skip the gate-vector similarity")
    parser.add_argument("--experts", default=None, help="experts.json (default: <routing_dir>/../experts.json)")
    parser.add_argument("--own_expert", nargs="*", default=[], metavar="DATASET=EXPERT",
                        help="a dataset's own expert, overriding the scope match")
    parser.add_argument("--out_dir", default=None, help="default: <routing_dir>/diagnosis")
    parser.add_argument("--collapse_threshold", type=float, default=None,
                        help="flag a module when more than this share of tasks has the same top expert (0.8)")
    args = parser.parse_args(argv)
    from colm.procedures.routing_analysis import COLLAPSE_THRESHOLD, OUTPUT_FILES, run_routing_diagnosis

    try:
        paths = run_routing_diagnosis(
            args.routing_dir, checkpoint=False if args.no_checkpoint else args.checkpoint,
            experts_file=args.experts, own_expert=parse_own_expert(args.own_expert), out_dir=args.out_dir,
            collapse_threshold=COLLAPSE_THRESHOLD if args.collapse_threshold is None else args.collapse_threshold)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
        print(f"[colm] error: {error}", file=sys.stderr)
        return 1
    with open(paths["markdown"]) as f:
        print(f.read())
    print("[colm] wrote " + ", ".join(paths[k] for k in OUTPUT_FILES if k in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
