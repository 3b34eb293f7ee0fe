"""Experiments: real data, Flax models and compiled, resumable sweeps over batch size and momentum.

Run ``python -m experiments --help`` for the command line; the engine is importable as
:mod:`experiments.train` (``run_group``) and the results store as :mod:`experiments.store`.
"""
