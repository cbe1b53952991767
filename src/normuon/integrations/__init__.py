"""Entry points for training frameworks. None of them imports its framework at import time.

- :mod:`normuon.integrations.huggingface`: ``optimizer_cls_and_kwargs`` for
  ``transformers.Trainer``.
- Lightning needs no adapter: build the optimizer from :func:`normuon.param_groups` in
  ``configure_optimizers`` (see ``examples/lightning_train.py``).
"""
