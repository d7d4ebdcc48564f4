"""Load generator and baselines."""
