"""The coupled-mode wire: KServe v2 / Open Inference Protocol names the server and client share.

One request carries one sequence's new tokens (batch 1)::

    POST /v2/models/{MODEL_NAME}/infer
      inputs      input_ids INT64 [1, T], shadow_states FP32|FP16 [1, T, d]
      parameters  sequence_id, sequence_start, sequence_end, sequence_offset (optional)
    <- outputs    hidden_states [1, T, d] in the dtype of shadow_states
       parameters sequence_length (tokens the server now holds for the sequence)

A ``sequence_offset`` below the tokens held makes the server drop the tokens after it first (the
rollback of drafts rejected in speculative mode); above them, the request is refused (409).

The tensor names are the ``cloud/backbone`` graph's (:mod:`~shadowpeft.runtime.contract.graph_io`).
To add a wire parameter: declare it here, then read it from here in the server and the client.
"""

from __future__ import annotations

from shadowpeft.runtime.contract.graph_io import HIDDEN_STATES, INPUT_IDS, SHADOW_STATES

__all__ = [
    "MODEL_NAME",
    "MODEL_VERSION",
    "SEQUENCE_END",
    "SEQUENCE_ID",
    "SEQUENCE_LENGTH",
    "SEQUENCE_OFFSET",
    "SEQUENCE_START",
    "WIRE_DTYPES",
    "WIRE_INPUTS",
    "WIRE_OUTPUT",
]

#: The served model's name in request URLs (shadow-serve's, and shadow-triton's default).
MODEL_NAME = "shadow-backbone"
MODEL_VERSION = "1"

# Request parameters of the sequence extension.
SEQUENCE_ID = "sequence_id"  # int in [1, 2**64) or a string: which sequence's KV cache
SEQUENCE_START = "sequence_start"  # bool: (re)start the sequence with these tokens
SEQUENCE_END = "sequence_end"  # bool: free the sequence after this request
SEQUENCE_OFFSET = "sequence_offset"  # int >= 0: tokens the client believes the server holds; smaller: roll back
# Response parameter.
SEQUENCE_LENGTH = "sequence_length"  # tokens the server holds for the sequence after the request

#: Inputs a request sends and the output it gets back.
WIRE_INPUTS: tuple[str, str] = (INPUT_IDS, SHADOW_STATES)
WIRE_OUTPUT = HIDDEN_STATES
#: Element types ``shadow_states`` (and so ``hidden_states``) may travel in.
WIRE_DTYPES: tuple[str, ...] = ("float16", "float32")
