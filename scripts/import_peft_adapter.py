"""Import a LoRA adapter saved by HF PEFT as a one-expert colm checkpoint (colm/formats/peft_adapters.py).

    python scripts/import_peft_adapter.py --adapter path/to/peft_adapter \
        --out_path datasets_concatenated/MyTask_t5xl_lora [--base_model google/t5-xl-lm-adapt]

Writes exp_out/<out_path>/best.pt in the layout put_index_to_lora gives a trained LoRA, ready for gate training,
concatenation or evaluation (-arch single). PEFT's scale (lora_alpha / r, or / sqrt(r) with use_rslora) is folded
into the weights for colm's FFNExperts.d_bottleneck (--d_bottleneck, 16 in every shipped gin). The base model
(default: the adapter's base_model_name_or_path) is read from its config alone, to check the adapted modules and
give the linears the adapter leaves alone a zero expert. Run from the repository root.
"""

import argparse
import json
import os
import sys

from colm.formats import layout
from colm.formats.checkpoint_io import write_experiment
from colm.formats.peft_adapters import CONFIG_FILE, import_adapter

# Where colm's model gins put experts (make_moe.expert_modules of ENCODER and DECODER).
EXPERT_MODULES = ["encoder_linear", "decoder_linear"]


def base_linears(base_model: str, patterns) -> dict:
    """{module: (d_in, d_out)} of the base model's linears matching the module-name patterns; the model is built
    on the meta device from its config, so no weights are read."""
    import torch
    import transformers

    from colm.models import module_names
    from colm.models.hf_loading import MODEL_CLASSES, resolve_name_or_path

    try:
        config = transformers.AutoConfig.from_pretrained(resolve_name_or_path(base_model))
    except OSError as error:
        raise OSError(f"Could not read the config of the base model {base_model!r} ({str(error).splitlines()[0]}). "
                      "Give --base_model a local copy of it, or --no_base_check.") from None
    model_class = MODEL_CLASSES["seq2seq_lm" if config.is_encoder_decoder else "causal_lm"]
    with torch.device("meta"):
        model = model_class.from_config(config)
    found = module_names.match_modules(model, patterns, module_names.architecture_of(model))
    return {name: (m.in_features, m.out_features) for name, m in found.items() if isinstance(m, torch.nn.Linear)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the directory PEFT's save_pretrained wrote")
    parser.add_argument("--out_path", required=True, help="experiment path relative to exp_out/")
    parser.add_argument("--base_model", default=None,
                        help="hub name or directory of the base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--no_base_check", action="store_true",
                        help="skip the base model: only the adapted modules get an expert (no check, no zero experts)")
    parser.add_argument("--expert_modules", nargs="+", default=EXPERT_MODULES,
                        help="module-name shortcuts or regexes of the linears colm puts experts on")
    parser.add_argument("--d_bottleneck", type=float, default=16,
                        help="FFNExperts.d_bottleneck of the model that runs the expert (1 if divide_by_d_bottleneck "
                             "is False)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing exp_out/<out_path>/best.pt")
    args = parser.parse_args(argv)
    try:
        out_file = layout.checkpoint_file(args.out_path, "--out_path")
        if os.path.exists(out_file) and not args.overwrite:
            raise FileExistsError(f"{out_file} exists; choose another --out_path or pass --overwrite.")
        linears = None
        if not args.no_base_check:
            base = args.base_model
            if base is None:
                with open(os.path.join(args.adapter, CONFIG_FILE)) as f:
                    base = json.load(f).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{args.adapter}/{CONFIG_FILE} names no base model: give --base_model "
                                 "(or --no_base_check).")
            linears = base_linears(base, args.expert_modules)
            if not linears:
                raise ValueError(f"--expert_modules {args.expert_modules} match no linear of {base}.")
        state = import_adapter(args.adapter, args.d_bottleneck, linears)
        write_experiment(state, args.out_path, "--out_path")
    except (ValueError, OSError, KeyError, NotImplementedError) as error:
        print(f"[colm] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
