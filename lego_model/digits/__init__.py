"""The shipped demo model's application: digits data, training, the digit classifier and the quality table.

This package builds on the reference core of :mod:`lego_model` (configs, model,
preconditioning, sampler, skip plans, checkpoints); the core never imports it.
Commands: ``python -m lego_model.digits.train``, ``python -m lego_model.digits.classifier``,
``python -m lego_model.digits.quality``.
"""
