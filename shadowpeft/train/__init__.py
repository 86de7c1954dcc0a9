"""Training and evaluation around the method core.

* ``datasets``, ``corpora``, ``encoding``: task data, the real corpora,
  tokenisation and collation.
* ``trainer``: the Hugging Face Trainer harness, its settings and phases; ``recipes``: the detached-quality levers.
* ``jobs``: what ``shadowpeft train`` / ``eval`` run; ``evaluation``: accuracy per mode; ``selective``: escalation.
* ``baselines``: LoRA / DoRA through ``peft`` at a matched budget.

May import the method core and ``shadowpeft.checkpoint``; never ``shadowpeft.export`` or ``shadowpeft.runtime``.
"""
