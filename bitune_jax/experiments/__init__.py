"""Experiments: the digits demo's source model, the papers' table specs and the sweep
that runs them, their results and plots."""
