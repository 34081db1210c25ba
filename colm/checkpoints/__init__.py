"""Checkpoint surgery as library functions: key formats (keys), expert settings (expert_order), manipulations,
concatenation, and the func_caller command line (cli) behind scripts/manipulations.py and scripts/concatenate.py."""
