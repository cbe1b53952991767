"""Entry points for training frameworks.

- :mod:`normuon.integrations.huggingface`: ``optimizer_cls_and_kwargs`` for
  ``transformers.Trainer`` (does not import transformers).
- :mod:`normuon.integrations.torchtitan`: an optimizer container and the ``normuon``/``muon``
  overrides for torchtitan's trainer (imports torchtitan).
- :mod:`normuon.integrations.torchtitan_data`: torchtitan's debug configs on normuon's embedded
  corpus (a byte tokenizer and loader), for ``--module normuon.integrations.torchtitan_data``
  (imports torchtitan).
- Lightning needs no adapter: build the optimizer from :func:`normuon.param_groups` in
  ``configure_optimizers`` (see ``examples/lightning_train.py``).
"""
