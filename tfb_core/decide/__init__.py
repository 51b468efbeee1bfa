"""Deciding from posterior samples: what the probabilities mean and what to answer.

:mod:`~tfb_core.decide.uncertainty` summarises Monte Carlo samples (entropies, mutual information)
and scores calibration (ECE, NLL, Brier, temperature scaling); :mod:`~tfb_core.decide.conformal`
turns a labelled calibration set into prediction sets and abstention at a target risk;
:mod:`~tfb_core.decide.selective` measures acting on uncertainty on held-out data (risk-coverage,
AUROC). Functions over probability tensors: no model, no torch modules, and no imports from the
rest of tfb_core.
"""
