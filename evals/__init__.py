"""Accuracy comparisons of a quantised model with its reference; installed as r1v_quant.evals."""
