"""ONNX export of ShadowPEFT models: graphs, validation, quantization, manifest writing.

Installed as ``shadowpeft.export``. May import ``shadowpeft`` and ``shadowpeft.runtime``.
"""
