"""The batched Monte Carlo forward: N posterior samples of many prompts in one forward of the model.

:mod:`~tfb_core.forward.planning` groups inputs into forwards (pure arithmetic on token counts);
:mod:`~tfb_core.forward.layout` says which job, sample and noise each row of a forward is (pure);
:mod:`~tfb_core.forward.prefix_cache` keeps a shared prompt prefix's keys and values per posterior
sample; :mod:`~tfb_core.forward.classifier` runs the model and reads the class tokens at the last
position. Imports point down to :mod:`tfb_core.bayes` and :mod:`tfb_core.data.tasks`, never up.
"""
