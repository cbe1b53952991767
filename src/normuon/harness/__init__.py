"""Comparison harness: train a GPT with AdamW, Muon and NorMuon on real text and compare.

Uses only the library's public API (``NorMuon``, ``Muon``, ``param_groups``). Needs the
``harness`` extra (tqdm, matplotlib), imported lazily where used. Entry point: ``normuon``
(:mod:`normuon.cli`) with the subcommands ``compare``, ``sweep`` and ``train``.

Modules: ``config`` (typed settings, presets, overrides), ``spec`` (a command's settings
resolved and validated once into a frozen :class:`~normuon.harness.spec.RunSpec`, which
everything downstream reads), ``data``, ``model``, ``runtime`` (device, process group,
teardown), ``checkpoint`` (run folders, atomic writes, safe loading),
``train`` (the :class:`~normuon.harness.train.Trainer` loop), ``compare`` (running
comparisons and sweeps) and ``report`` (tables, statistics, figures).
"""
