"""Runs: the embedded data set and model training, cached end-to-end runs, the shipped-runs store."""
