"""The GPU planner: memory, the batch each GPU fits, hours and cost of a training configuration.

:func:`~prsmed.plan.estimate.plan` simulates one step of the model on fake tensors (:mod:`prsmed.plan.simulate`),
turns it into memory per GPU and time (:mod:`prsmed.plan.estimate`) and prices it from the catalogue
(:mod:`prsmed.plan.catalogue`). :mod:`prsmed.plan.measure` and :mod:`prsmed.plan.calibrate` check the estimate
against real steps. See docs/cloud-training.md.

Import from the submodules; this package imports nothing, so ``prsmed --help`` stays cheap (no torch).
"""
