"""Torch-free onnxruntime runtime for exported ShadowPEFT graphs.

Installed as ``shadowpeft.runtime``. Imports only numpy, onnxruntime and tokenizers: never torch
or transformers, so it runs on laptops and phones.
"""
