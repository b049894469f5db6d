"""The embedded default: the synthetic scene world (world.py), the tiny-checkpoint builder (tiny.py),
stage 0's supervised warm-up (warmup.py) and the shipped tiny base (stage0/). Used by train.py and
eval.py when no --model / --data is given. Tested by: python -m pytest tests/test_world.py tests/test_model.py
"""
