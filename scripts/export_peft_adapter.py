"""Export colm experts as HF PEFT LoRA adapters (colm/formats/peft_adapters.py).

    # one expert (the only one of a single-expert checkpoint, or --index i of a concatenated one)
    python scripts/export_peft_adapter.py --path datasets_concatenated/MyTask_t5xl_lora --out_dir exp_out/peft/MyTask
    # a PHATGOOSE-routed set: one adapter per expert, router.safetensors and routing.json
    python scripts/export_peft_adapter.py --path FullCompleteA2inpgatetrainnogumbel_t5xl_lora_concatenated \
        --out_dir peft/phatgoose --routed_set

--path is an experiment path relative to exp_out/ (its best.pt) or a checkpoint file. A routed set names its
adapters from the experts.json beside a concatenated checkpoint (expert_000, ... without one). Load an adapter
with `PeftModel.from_pretrained(base_model, "<out_dir>")`. Run from the repository root.
"""

import argparse
import os
import sys

from colm.formats import layout
from colm.formats.checkpoint_io import read_checkpoint
from colm.formats.experts_file import read_experts_file
from colm.formats.peft_adapters import export_expert, export_routed_set


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="experiment path relative to exp_out/, or a checkpoint file")
    parser.add_argument("--out_dir", required=True, help="the adapter directory (with --routed_set: the set's)")
    parser.add_argument("--index", type=int, default=None, help="the expert to export from a concatenated checkpoint")
    parser.add_argument("--routed_set", action="store_true", help="export every expert and the router vectors")
    parser.add_argument("--top_k", type=int, default=2, help="with --routed_set: the top-k the routing rule states")
    parser.add_argument("--d_bottleneck", type=float, default=16,
                        help="FFNExperts.d_bottleneck of the model that ran the experts (1 if divide_by_d_bottleneck "
                             "is False)")
    parser.add_argument("--base_model", default=None, help="written as base_model_name_or_path")
    parser.add_argument("--task_type", default=None, help="PEFT task type written to the config, e.g. SEQ_2_SEQ_LM")
    parser.add_argument("--overwrite", action="store_true", help="replace existing adapter files")
    args = parser.parse_args(argv)
    try:
        file = args.path if os.path.isfile(args.path) else layout.checkpoint_file(args.path, "--path")
        state = read_checkpoint(file)
        common = dict(d_bottleneck=args.d_bottleneck, base_model=args.base_model, task_type=args.task_type,
                      overwrite=args.overwrite, what=file)
        if args.routed_set:
            if args.index is not None:
                raise ValueError("--index and --routed_set exclude each other (a routed set exports every expert).")
            names_file = os.path.join(os.path.dirname(file), layout.EXPERTS_FILE)
            names = [e["name"] for e in read_experts_file(names_file)] if os.path.isfile(names_file) else None
            written = export_routed_set(state, args.out_dir, names, top_k=args.top_k, **common)
            print(f"[colm] wrote {len(written)} PEFT adapters and the router vectors to {args.out_dir}")
        else:
            export_expert(state, args.out_dir, args.index, **common)
            print(f"[colm] wrote the PEFT adapter {args.out_dir}")
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        print(f"[colm] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
