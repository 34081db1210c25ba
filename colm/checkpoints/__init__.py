"""Checkpoint surgery as library functions on flat {key: tensor} dicts (key spellings: colm/formats/keys.py).

Every operation comes twice: a pure function `<name>_state(...)` on dicts (what tests use), and a
gin-configurable file-level wrapper `<name>(path, out_path, ...)` that reads `exp_out/<path>/best.pt` and
writes `exp_out/<out_path>/best.pt` atomically (paths relative to exp_out/, colm/formats/layout.py). Bad input
is refused before anything is written, so an existing output is never destroyed.

- experts.py              put_index_to_lora (LoRA -> MoE format), concatenate_two_checkpoints, normalize_expert_weights
- gates.py                use_input_gate_as_router, use_input_gate_in_router_and_expert, delete_expert_input_gate
- router_vectors.py       create / delete / add_router_embeddings, svd_orthogonalize_router
- router_from_weights.py  create_router_embeddings_from_weights (simple, eigen-weighted, Arrow)
- decoder_router.py       make_one_router_decoder, make_a_specific_checkpoint (A1 decoder routers)
- blocks.py               merge_into_blocks, make_router_blockwise, skip_blocks, skip_alternate
- merging.py              average_lora_weights, average_outer_product_lora_weights (Merged Experts)
- retrieval.py            make_checkpoint_for_retrieval
- averaged_hiddens.py     insert_averaged_hiddens (Average Activation)
- concatenate.py          run_concatenate, commands_concatenate
- common.py               refusals and dict helpers the modules share
- cli.py                  the func_caller command line behind scripts/manipulations.py and scripts/concatenate.py
"""
