"""The serving benchmark (``tools/bench_serving.py``), one module per measurement:

- ``update_latency``: update latency per transport vs a Triton reload and the memcpy floor;
- ``inference``: steady-state inference speed;
- ``memory``: weight copies resident;
- ``under_load``: p50/p99 and correctness while updates stream in;
- ``report``: the tables; ``main``: the command; ``common``: what they share.
"""
