"""Measurements, not tests: speed.py (design ratios at sandbox scale), scale.py (real model sizes on CPU),
memory.py (--shard memory per rank, estimates per GPU), smoke.py (the first run on a GPU). Run each as a
module from the repository root, e.g. `python -m bench.speed`. Tested by: python -m pytest tests/test_smoke.py
"""
