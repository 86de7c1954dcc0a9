"""The handshake at the start of split decoding: does the server run the backbone this export was made with?

A device export and the server's export come from one ``shadow-export`` run: the device keeps
``device/shadow`` and ``device/head``, the server serves ``cloud/backbone``, and both copies carry
the same ``manifest.json``. The server publishes what identifies its backbone in the model metadata
(``GET /v2/models/shadow-backbone``, under ``shadowpeft``); the device compares it with its own
manifest before its first step::

    server metadata                     device manifest
    base_fingerprint               ==   base_fingerprint                    (the base model)
    graph_sha256                   ==   graphs["cloud/backbone"].sha256      (the adapter's layers too)
    graph_external_data            ==   graphs["cloud/backbone"].external_data  (weights stored outside)

The graph comparisons are made when both sides carry them (a device manifest without
``cloud/backbone``: the base fingerprint only). A server that publishes none of these (not
shadow-serve, e.g. a Triton model) cannot be checked; the client logs a warning once and goes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shadowpeft.runtime.contract import CLOUD_BACKBONE
from shadowpeft.runtime.manifest import Manifest

__all__ = ["METADATA_KEY", "BackboneCheck", "check_backbone"]

#: The model metadata's extension object that carries the backbone's identity.
METADATA_KEY = "shadowpeft"


@dataclass(frozen=True)
class BackboneCheck:
    """What the handshake compared and what differed.

    Attributes:
        url: The server.
        compared: What was compared, e.g. ``("base_fingerprint", "cloud/backbone sha256")`` (empty: the
            server publishes nothing to compare).
        differences: One line per difference, naming the server's value and the export's.
    """

    url: str
    compared: tuple[str, ...]
    differences: tuple[str, ...]

    @property
    def matches(self) -> bool:
        """Whether nothing compared differed (also true when nothing could be compared)."""
        return not self.differences

    @property
    def verified(self) -> bool:
        """Whether anything was compared."""
        return bool(self.compared)

    def mismatch(self) -> str:
        """The explanation of a mismatch: what differs and what to do."""
        return (
            f"The backbone server at {self.url} runs a different backbone than this export was made with: "
            f"{'; '.join(self.differences)}. Its hidden states would not be this checkpoint's, so neither would the "
            "tokens. Serve the export made from the same checkpoint (the cloud/backbone of the same shadow-export "
            "run as this device export: shadow-serve EXPORT_DIR), or run with --mode detached."
        )


def check_backbone(manifest: Manifest, metadata: Mapping[str, Any], *, url: str) -> BackboneCheck:
    """Compares the server's published backbone identity with the device export's manifest.

    Args:
        manifest: The device export's manifest.
        metadata: The server's model metadata (``GET /v2/models/{name}``).
        url: The server, for messages.

    Returns:
        The check; see :attr:`BackboneCheck.matches` and :attr:`BackboneCheck.verified`.
    """
    served = metadata.get(METADATA_KEY) if isinstance(metadata, Mapping) else None
    served = served if isinstance(served, Mapping) else {}
    graph = manifest.graphs.get(CLOUD_BACKBONE)
    pairs = [("base_fingerprint", served.get("base_fingerprint"), manifest.base_fingerprint)]
    if graph is not None:
        pairs.append((f"{CLOUD_BACKBONE} sha256", served.get("graph_sha256"), graph.sha256))
        external = served.get("graph_external_data")
        pairs.append((f"{CLOUD_BACKBONE} external data", _as_dict(external), dict(graph.external_data)))
    compared, differences = [], []
    for what, theirs, ours in pairs:
        if theirs is None:  # an older server, or not shadow-serve: nothing to compare
            continue
        compared.append(what)
        if theirs != ours:
            differences.append(f"the server's {what} is {_show(theirs)}, this export's is {_show(ours)}")
    return BackboneCheck(url, tuple(compared), tuple(differences))


def _as_dict(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in sorted(value.items())) + "}" if value else "none"
    text = str(value)
    return repr(text[:23] + "..." if len(text) > 26 else text)
