"""The data room: dataset classes and families, metrics, the gin registries (colm/datasets/*.gin) and which
scopes run in which order (settings.py). colm.datasets.families finds the families; this file imports nothing,
so that `python -m colm.datasets.families` (the launchers' registry list) starts fast."""
