"""Evaluating a model: classification (MLE, TFB, temperature scaling; ``tfb eval``), its report, and generation."""
