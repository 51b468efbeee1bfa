"""The Bayesian layers: what turns a trained LoRA adapter into a posterior one can sample from.

:mod:`~tfb_core.bayes.lora` is the only module that knows peft's internals (find the LoRA modules,
read A, B and the scaling); :mod:`~tfb_core.bayes.posterior` re-parameterises each module by the SVD
of B (B'A' = BA), holds the Gaussian over A' with one sigma and draws its noise with explicit seeds;
:mod:`~tfb_core.bayes.routing` lets several adapters share one base model, each row of a forward
going through its own adapter. Nothing here knows prompts, tasks or batches: that is
:mod:`tfb_core.forward`.
"""
