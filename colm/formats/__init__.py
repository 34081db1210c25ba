"""On-disk formats, the ground floor: imported by moma, checkpoints and procedures alike; imports nothing of colm
above utils.

- keys.py           checkpoint key spellings
- checkpoint_io.py  reading and writing checkpoint files (atomic writes, no code run from a file)
- layout.py         where files live under exp_out/ (best.pt, results.txt, experts.json, averages, libraries)
- experts_file.py   experts.json: the names of a concatenated checkpoint's experts
- peft_adapters.py  HF PEFT LoRA adapters in and out of the expert format
"""
