"""The benchmarks: scripts that measure the library on real models and data and commit their figures as JSON under
``benchmarks/results/`` (see README.md here). Run one as ``python benchmarks/<name>.py``; tests import them as
modules (``from benchmarks import utility``). They use only the public API of `peft_post`, and none imports another.
"""
