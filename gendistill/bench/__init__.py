"""`gendistill bench`, in four parts, each importable alone:

- checks.py: the correctness gates (the student's fast path against its reference) that must pass before timing;
- measure.py: time to first token (forward, `generate()`, CUDA graph), decode speed, peak memory, cache bytes;
- targets.py: the targets as data, and the function that scores a run against them;
- render.py: the markdown table and plots; run.py: one whole run; cli.py: the command.

The analytic cache size is `gendistill.modeling.cache_bytes`, beside the config it reads.
"""
