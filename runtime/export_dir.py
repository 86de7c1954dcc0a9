"""Opening an export directory: verify its manifest and files, then create onnxruntime sessions.

Sessions take their execution providers and thread count from a device profile (overridable);
providers the installed onnxruntime lacks are dropped with a log line, and the CPU provider is
always last, so a profile written for a phone still opens on a laptop. A graph whose export carries
an ``.ort`` copy (its device profile asked for one) loads from that copy (see
:mod:`shadowpeft.runtime.graph_format`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from shadowpeft.runtime.contract import GraphSpec
from shadowpeft.runtime.devices import DeviceProfile
from shadowpeft.runtime.errors import ExportLoadError
from shadowpeft.runtime.graph_format import GraphFormat, graph_sources, unread_files
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.manifest_files import export_file, verify_files

__all__ = ["ExportDir", "open_export", "session_options"]

logger = logging.getLogger(__name__)


@dataclass
class ExportDir:
    """A verified export directory; sessions are created on first use and then reused.

    Attributes:
        root: The directory.
        manifest: Its verified manifest.
        providers: onnxruntime providers, in priority order.
        threads: Intra-op threads per session (``None``: onnxruntime's default).
        spin_wait: Let idle intra-op threads spin instead of sleeping (see :func:`session_options`).
        cpu_arena: Use onnxruntime's CPU memory arena (see :func:`session_options`).
        graph_format: ``auto``, ``onnx`` or ``ort``: whether graphs load from their ``.ort`` copies.
        sources: Graph key -> the manifest key whose file its session loads (itself, or its
            ``ort/`` copy); a key not listed loads its own file.
    """

    root: Path
    manifest: Manifest
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None
    spin_wait: bool = True
    cpu_arena: bool = True
    graph_format: GraphFormat = "auto"
    sources: dict[str, str] = field(default_factory=dict)
    _sessions: dict[str, ort.InferenceSession] = field(default_factory=dict, repr=False)

    def has(self, key: str) -> bool:
        return key in self.manifest.graphs

    def graph(self, key: str) -> GraphSpec:
        """The graph spec under ``key`` (raises ManifestError naming the ones there are)."""
        return self.manifest.graph(key)

    def file_of(self, key: str) -> str:
        """The file (relative to :attr:`root`) that graph ``key``'s session loads: its ``.onnx`` or ``.ort`` copy."""
        return self.graph(self.sources.get(key, key)).file

    def session(self, key: str) -> ort.InferenceSession:
        """The onnxruntime session of graph ``key``, from its ``.ort`` copy where :attr:`sources` says so.

        With ``graph_format="auto"``, a copy onnxruntime cannot load gives way to the ``.onnx`` graph
        (if the export has it), with a warning; with ``"ort"`` it is an error.

        Raises:
            ManifestError: The export has no such graph, or its file is a link or outside the export.
            ExportLoadError: onnxruntime cannot load the file.
        """
        if key not in self._sessions:
            self.graph(key)  # an unknown key: the ManifestError names the graphs there are
            source = self.sources.get(key, key)
            try:
                self._sessions[key] = self._load(source, copy_of=key if source != key else None)
            except ExportLoadError as err:
                onnx_file = self.graph(key).file
                if source == key or self.graph_format != "auto" or not (self.root / onnx_file).is_file():
                    raise
                logger.warning("%s; running %s instead (pass graph_format='onnx' to skip the copy)", err, onnx_file)
                self._sessions[key] = self._load(key)
                self.sources[key] = key
        return self._sessions[key]

    def _load(self, source: str, *, copy_of: str | None = None) -> ort.InferenceSession:
        """A session on the file of manifest key ``source``: a graph, or the ``.ort`` copy of graph ``copy_of``."""
        spec = self.graph(source)
        path = export_file(self.root, spec.file)  # checked again: open_export(verify=False) skips verify_files
        options = session_options(self.threads, spin_wait=self.spin_wait, cpu_arena=self.cpu_arena)
        if copy_of is not None:
            options.add_session_config_entry("session.load_model_format", "ORT")
        try:
            return ort.InferenceSession(str(path), options, providers=list(self.providers))
        except Exception as err:  # onnxruntime's own exception types
            if copy_of is None:
                raise ExportLoadError(
                    f"onnxruntime could not load {spec.file} from {self.root}: {err}. The file may come from a "
                    "newer exporter or need an execution provider this onnxruntime lacks; re-export."
                ) from err
            raise ExportLoadError(
                f"onnxruntime {ort.__version__} could not load {spec.file}, the .ort copy of {copy_of}, from "
                f"{self.root}: {err}. An .ort file loads only in onnxruntime versions that read its format; run "
                f"the .onnx graph instead (shadow-run --graph-format onnx, open_export(graph_format='onnx'); "
                f"it needs {self.graph(copy_of).file}), or re-export with this onnxruntime."
            ) from err


def session_options(threads: int | None, *, spin_wait: bool = True, cpu_arena: bool = True) -> ort.SessionOptions:
    """Session options: intra-op threads (if given), quiet logs, full graph optimization.

    ``spin_wait=False`` makes idle intra-op threads sleep at once instead of spinning for a while
    after each run. Spinning shaves a little latency off back-to-back runs of one session, but every
    session has its own pool, so when a device session and a backbone session (or shadow-serve and
    the device runtime on one machine) take turns, each one's spinning threads hold the cores the
    other needs: split decoding over loopback on 2 cores measured 84 ms/token spinning and 45 ms/token
    without. A process that waits on the network between runs (the server, coupled and auto modes)
    should not spin either; it only burns CPU (and battery) while it waits.

    ``cpu_arena=False`` allocates each run's buffers from the system allocator instead of onnxruntime's
    CPU arena, which grows to the largest run and never gives memory back. A server whose steps vary in
    size should not keep its largest step's memory forever: on the toy backbone a 4,096-token prefill
    left the process at 895 MB with the arena and 83 MB without (peak 895 vs 696 MB), at the same speed
    for 512-token steps (the server's default cap) and half the speed at 4,096 tokens.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin_wait:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = cpu_arena
    return options


def open_export(
    path: str | Path,
    *,
    profile: DeviceProfile | None = None,
    providers: tuple[str, ...] | None = None,
    threads: int | None = None,
    verify: bool = True,
    spin_wait: bool = True,
    cpu_arena: bool = True,
    graph_format: GraphFormat = "auto",
) -> ExportDir:
    """Reads and verifies an export directory (manifest schema and every file's sha256).

    Args:
        path: The directory ``shadow-export`` wrote.
        profile: Device profile for providers and threads.
        providers: Overrides the profile's providers.
        threads: Overrides the profile's thread count.
        verify: Check every file's sha256 (on by default; a tampered or half-copied export is refused).
        spin_wait: Let idle onnxruntime threads spin; pass ``False`` in a server, and on a device that
            talks to one (see :func:`session_options`).
        cpu_arena: Use onnxruntime's CPU memory arena; pass ``False`` in a server (it gives memory back
            after a large step, see :func:`session_options`).
        graph_format: ``auto`` loads each graph from the ``.ort`` copy the export carries for it (an
            export for an ``ort_format = true`` profile), ``onnx`` ignores the copies, ``ort`` requires
            them (see :mod:`shadowpeft.runtime.graph_format`). A graph loaded from its copy may lack its
            ``.onnx`` file.

    Raises:
        ManifestError: Missing, invalid or newer manifest; a missing file or a sha256 mismatch (``.ort``
            copies included).
        ExportLoadError: ``graph_format="ort"`` and the export has no ``.ort`` copies.
    """
    root = Path(path)
    manifest = Manifest.from_file(root)
    sources = graph_sources(manifest.graphs, graph_format, source=str(root))
    if verify:
        verify_files(root, manifest, unread=unread_files(root, manifest.graphs, sources))
    wanted = providers or (profile.providers if profile is not None else ("CPUExecutionProvider",))
    available = set(ort.get_available_providers())
    usable = tuple(p for p in wanted if p in available)
    for dropped in sorted(set(wanted) - available):
        logger.info("execution provider %s is not in this onnxruntime build; skipped", dropped)
    if "CPUExecutionProvider" not in usable:
        usable = (*usable, "CPUExecutionProvider")
    count = threads if threads is not None else (profile.intra_op_threads if profile is not None else None)
    return ExportDir(root, manifest, usable, count, spin_wait, cpu_arena, graph_format, sources)
