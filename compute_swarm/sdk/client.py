"""The HTTP SDK for the coordinator: `SwarmClient` for buyers, `NodeClient` for the node agent.

Part of the light buyer install: it imports only the standard library, pydantic, httpx and the spec
and protocol modules. Large data moves in chunked, resumable uploads and Range downloads verified by
sha256; both clients share one implementation of each (see compute_swarm/coordinator/API.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from compute_swarm import protocol
from compute_swarm.protocol import AUTHORIZATION_HEADER, SHA256_PATTERN, TOKEN_SCHEME
from compute_swarm.swarm_transfer import TransferOffer

FINAL_JOB_STATES = protocol.FINAL_JOB_STATES
SUCCESSFUL_STATES = protocol.SUCCEEDED_JOB_STATES

UPLOAD_OFFSET_HEADER = "Upload-Offset"
# Answers that mean "the coordinator (or a proxy before it) is restarting": worth waiting for.
_RETRYABLE_STATUS = frozenset({502, 503, 504})
_HASH_BLOCK_BYTES = 1 << 20

Progress = Callable[[int, int], None]


class SwarmError(Exception):
    """A request the coordinator refused or could not answer. str(error) says what to do about it;
    `status_code` is the HTTP status (None when the coordinator could not be reached) and `detail` the
    coordinator's own explanation."""

    def __init__(self, message: str, *, status_code: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class DownloadTooLarge(SwarmError):
    """A download that went past the size it was to have (the one a lease states, or the one the
    server announced): stopped there and its bytes discarded. Trying again fetches the same bytes."""


class UnsafeArchiveError(SwarmError):
    """An archive with a member that could write outside its directory (absolute path, "..", link,
    device): nothing of it is extracted."""


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


# ---- archives: adapters and checkpoints travel as uncompressed tars


def pack_directory(directory: Path, archive: Path) -> str:
    """Write an uncompressed tar of `directory`'s regular files and return its sha256.

    Names are relative and sorted, and times, owners and modes are fixed, so the same files always
    give the same bytes (and so the same artifact). Links and special files are left out.
    """
    directory = Path(directory)
    archive = Path(archive)
    skip = archive.resolve()
    files: list[tuple[str, Path]] = []
    for root, folders, names in os.walk(directory, followlinks=False):
        folders.sort()
        for name in names:
            path = Path(root) / name
            if stat.S_ISREG(path.lstat().st_mode) and path.resolve() != skip:
                files.append((path.relative_to(directory).as_posix(), path))
    files.sort()
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in files:
            with path.open("rb") as source:
                info = tarfile.TarInfo(name)
                info.size = os.fstat(source.fileno()).st_size
                info.mode = 0o644
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, source)
    return sha256_of_file(archive)


SWEEP_COLUMNS = ("trial", "job_id", "state", "step", "eval_loss", "final_loss", "cost_micro")


class SweepTable(list):
    """A sweep's trials as rows (dicts), for when pandas is not installed; Jupyter shows it as a table.
    `sweep` is the whole sweep as the coordinator answered it, `best` its best trial (or None)."""

    def __init__(self, sweep: dict):
        super().__init__(sweep["trials"])
        self.sweep = sweep
        self.best = sweep.get("best")

    def columns(self) -> list[str]:
        swept = sorted(self.sweep["spec"]["parameters"])
        return [SWEEP_COLUMNS[0], *swept, *SWEEP_COLUMNS[1:]]

    def _repr_html_(self) -> str:
        from html import escape

        columns = self.columns()
        head = "".join(f"<th>{escape(name)}</th>" for name in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{escape(_cell(row.get(name)))}</td>" for name in columns) + "</tr>"
            for row in self
        )
        best = f"<p>best: trial {self.best['trial']} ({self.best['job_id']})</p>" if self.best else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{best}"

    def __str__(self) -> str:
        columns = self.columns()
        rows = [columns, *([_cell(row.get(name)) for name in columns] for row in self)]
        widths = [max(len(row[index]) for row in rows) for index in range(len(columns))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
        )


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sweep_table(sweep: dict):
    """A sweep's trials as a pandas DataFrame (indexed by trial) when pandas is installed, else a
    SweepTable."""
    table = SweepTable(sweep)
    try:
        import pandas
    except ImportError:
        return table
    frame = pandas.DataFrame(list(table), columns=table.columns()).set_index("trial")
    frame.attrs["sweep"] = sweep
    return frame


def unpack_archive(archive: Path, directory: Path) -> None:
    """Extract a tar into `directory`, which must not exist or be empty.

    Every member is checked first: absolute names, "..", links, devices and fifos are refused and
    nothing is written. Extraction goes into a temporary directory beside `directory`, renamed into
    place once complete, so `directory` never holds half an archive.
    """
    archive = Path(archive)
    directory = Path(directory)
    _refuse_non_empty(directory)
    with tarfile.open(archive, "r:") as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(member, archive)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".unpacking", dir=directory.parent)
        )
        try:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, members=members, filter="data")
            else:  # Python before 3.10.12/3.11.4: the checks above are the whole defence
                tar.extractall(staging, members=members)
            staging.chmod(0o755)  # mkdtemp's 0o700 is for the temporary name only
            _refuse_non_empty(directory)
            if directory.exists():
                directory.rmdir()
            os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]):
        raise UnsafeArchiveError(f"{archive.name} holds an absolute path ({name!r}); refusing to unpack it")
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive.name} holds a path leaving its directory ({name!r}); refusing to unpack it"
        )
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(
            f"{archive.name} holds a link or special file ({name!r}); refusing to unpack it"
        )


def _refuse_non_empty(directory: Path) -> None:
    if directory.is_dir() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} already exists and is not empty")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} already exists and is not a directory")


# ---- the shared HTTP session


class _UploadState(BaseModel):
    """The fields of an `Upload` answer that the transfer loop depends on."""

    model_config = ConfigDict(extra="allow")

    upload_id: str
    sha256: str
    size: int
    offset: int
    complete: bool
    chunk_limit: int
    file: dict[str, Any] | None = None


class _CoordinatorSession:
    """One HTTP connection pool to a coordinator, with the error mapping, the chunked upload and the
    resumable download that both clients use."""

    # Pauses before retrying a transfer after a dropped connection or a restarting coordinator.
    retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    _credential_name = "API key"

    def __init__(
        self,
        coordinator: str,
        credential: str | None,
        *,
        timeout: float,
        transport: httpx.BaseTransport | None,
    ):
        self.coordinator = _normalise_address(coordinator)
        headers = {"User-Agent": "compute-swarm-sdk"}
        if credential is not None:
            headers[AUTHORIZATION_HEADER] = f"{TOKEN_SCHEME} {credential}"
        self._http = httpx.Client(
            base_url=self.coordinator, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plain requests

    def _request(self, method: str, path: str, *, not_found: str | None = None, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        if response.is_error:
            raise self._error(response, not_found=not_found)
        try:
            return response.json()
        except ValueError:
            raise SwarmError(
                f"the coordinator at {self.coordinator} answered {method} {path} with something that "
                "is not JSON: is that address really a compute-swarm coordinator?",
                status_code=response.status_code,
            ) from None

    def _unreachable(self, error: httpx.TransportError) -> SwarmError:
        if isinstance(error, httpx.TimeoutException):
            return SwarmError(
                f"the coordinator at {self.coordinator} did not answer in time ({error or 'timeout'})"
            )
        return SwarmError(f"cannot reach the coordinator at {self.coordinator}: {error}")

    def _error(self, response: httpx.Response, *, not_found: str | None = None) -> SwarmError:
        status = response.status_code
        detail = _detail_of(response)
        if status == 401:
            message = f"the coordinator at {self.coordinator} refused the {self._credential_name}"
            if detail:
                message += f" ({detail})"
        elif status == 404 and not_found:
            message = not_found
        elif status == 402:
            message = f"not enough credits: {detail or 'the balance cannot cover the price'}"
        elif 400 <= status < 500:
            message = f"the coordinator refused: {detail or response.reason_phrase or f'HTTP {status}'}"
        else:
            message = f"the coordinator at {self.coordinator} failed (HTTP {status})"
            if detail:
                message += f": {detail}"
        return SwarmError(message, status_code=status, detail=detail)

    def _pause(self, setbacks: int, problem: SwarmError) -> None:
        """Wait before the next retry, or raise `problem` when the retries are used up."""
        if setbacks > len(self.retry_delays):
            raise problem
        time.sleep(self.retry_delays[setbacks - 1])

    # -- chunked, resumable upload (tus-like: PATCH with Upload-Offset)

    def _upload(
        self, path: str | os.PathLike, fields: dict[str, Any], progress: Progress | None
    ) -> _UploadState:
        path = Path(path)
        size = path.stat().st_size
        digest = sha256_of_file(path)
        upload = self._upload_state(
            self._request("POST", "/api/uploads", json={"sha256": digest, "size": size, **fields})
        )
        location = f"/api/uploads/{quote(upload.upload_id, safe='')}"
        setbacks = 0  # consecutive attempts that moved nothing
        with path.open("rb") as source:
            while not upload.complete:
                offset = upload.offset
                if progress is not None:
                    progress(offset, size)
                source.seek(offset)
                chunk = source.read(max(upload.chunk_limit, 1))
                if not chunk:
                    raise SwarmError(f"{path} shrank while it was being uploaded; upload it again")
                problem: SwarmError | None
                try:
                    response = self._http.patch(
                        location,
                        content=chunk,
                        headers={
                            UPLOAD_OFFSET_HEADER: str(offset),
                            "Content-Type": "application/offset+octet-stream",
                        },
                    )
                except httpx.TransportError as error:
                    problem = self._unreachable(error)
                else:
                    if response.status_code == 409:
                        # Our offset is not the coordinator's (an answer was lost): ask for its offset.
                        problem = None
                    elif response.status_code in _RETRYABLE_STATUS:
                        problem = self._error(response)
                    elif response.status_code in (413, 422):
                        # 422 on the last chunk: the content failed its sha256 or, for a dataset, is
                        # not JSON lines; the detail says which.
                        refusal = self._error(response)
                        raise SwarmError(
                            f"the coordinator refused {path.name}: {refusal.detail or refusal}",
                            status_code=refusal.status_code,
                            detail=refusal.detail,
                        )
                    elif response.is_error:
                        raise self._error(response)
                    else:
                        upload = self._upload_state(response.json())
                        setbacks = 0 if upload.complete or upload.offset > offset else setbacks + 1
                        if setbacks > len(self.retry_delays):
                            raise SwarmError(f"the upload of {path.name} makes no progress; try again later")
                        continue
                setbacks += 1
                if problem is not None:
                    self._pause(setbacks, problem)
                elif setbacks > len(self.retry_delays):
                    raise SwarmError(f"the upload of {path.name} keeps conflicting with another upload of it")
                upload = self._fetch_upload(location)
        if progress is not None:
            progress(size, size)
        return upload

    def _fetch_upload(self, location: str) -> _UploadState:
        """GET the upload's state from the coordinator, waiting out a dropped connection or a restart."""
        setbacks = 0
        while True:
            try:
                return self._upload_state(self._request("GET", location))
            except SwarmError as error:
                if error.status_code is not None and error.status_code not in _RETRYABLE_STATUS:
                    raise
                setbacks += 1
                self._pause(setbacks, error)

    def _upload_state(self, data: Any) -> _UploadState:
        try:
            return _UploadState.model_validate(data)
        except ValidationError as error:
            problem = error.errors()[0]
            raise SwarmError(
                f"the coordinator at {self.coordinator} sent an upload answer this client does not "
                f"understand ({problem['loc']}: {problem['msg']}); is the SDK out of date?"
            ) from None

    # -- resumable download (Range into a .partial file, verified, then renamed)

    def _download(
        self,
        path: str,
        destination: Path,
        sha256: str,
        *,
        what: str,
        not_found: str | None = None,
        progress: Progress | None = None,
        size: int | None = None,
    ) -> Path:
        """With `size`, no more than `size` bytes are written: past it the download stops, the partial
        file is removed and DownloadTooLarge is raised. Without it the server's announced size bounds
        the download the same way."""
        destination = Path(destination)
        partial = destination.with_suffix(".partial")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if size is not None and partial.exists() and partial.stat().st_size > size:
            partial.unlink()  # a stale partial file, longer than the whole: it cannot be resumed
        resumed = partial.exists() and partial.stat().st_size > 0
        restarted = False
        setbacks = 0
        while True:
            offset = partial.stat().st_size if partial.exists() else 0
            resumed = resumed or offset > 0
            try:
                self._receive(
                    path, partial, offset, what=what, not_found=not_found, progress=progress, size=size
                )
            except DownloadTooLarge:
                partial.unlink(missing_ok=True)
                raise
            except httpx.TransportError as error:
                # The bytes that arrived are kept in `partial`; the next request asks for the rest.
                received = partial.exists() and partial.stat().st_size > offset
                setbacks = 0 if received else setbacks + 1
                self._pause(max(setbacks, 1), self._unreachable(error))
                continue
            except SwarmError as error:
                if error.status_code not in _RETRYABLE_STATUS:
                    raise
                setbacks += 1
                self._pause(setbacks, error)
                continue
            # Here the whole content has arrived (or, after a 416, `partial` already held it).
            actual = sha256_of_file(partial) if partial.exists() else hashlib.sha256().hexdigest()
            if actual == sha256:
                os.replace(partial, destination)
                return destination
            partial.unlink(missing_ok=True)
            if resumed and not restarted:
                # The bad bytes may predate this call (a stale .partial): one clean try from zero.
                restarted = True
                continue
            raise SwarmError(
                f"the download of {what} was corrupted (sha256 {actual}, expected {sha256}); "
                "it was discarded: try again"
            )

    def _receive(
        self,
        path: str,
        partial: Path,
        offset: int,
        *,
        what: str,
        not_found: str | None,
        progress: Progress | None,
        size: int | None,
    ) -> None:
        """One GET of the bytes from `offset` on, appended to `partial` as they arrive, never past
        `size` (or, without it, past the size the server announces)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self._http.stream("GET", path, headers=headers) as response:
            if response.status_code == 416 and offset:
                return  # nothing past `offset`: `partial` already holds it all
            if response.is_error:
                response.read()
                raise self._error(response, not_found=not_found)
            # A 200 is the whole content (the server ignored Range); a 206 must start where we asked.
            start, total = _content_range(response)
            if start not in (0, offset):
                raise SwarmError(
                    f"the coordinator at {self.coordinator} sent bytes from {start} when asked for "
                    f"bytes from {offset}"
                )
            if size is not None and total is not None and total > size:
                raise DownloadTooLarge(
                    f"{what} is {total} bytes, more than the {size} bytes expected; nothing was downloaded"
                )
            limit = size if size is not None else total
            done = start
            with partial.open("ab" if start else "wb") as sink:
                try:
                    for block in response.iter_bytes():
                        if limit is not None and done + len(block) > limit:
                            expected = "expected" if size is not None else "the coordinator announced"
                            raise DownloadTooLarge(
                                f"{what} is larger than the {limit} bytes {expected}: the download was "
                                "stopped and discarded"
                            )
                        sink.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total or done)
                finally:
                    sink.flush()
                    os.fsync(sink.fileno())


# ---- buyers


class SwarmClient(_CoordinatorSession):
    """The buyer SDK: upload datasets, submit and follow LoRA jobs, download adapters, see credits.

    >>> with SwarmClient("https://swarm.example", "swarm-buyer-...") as swarm:
    ...     dataset = swarm.upload_file("data.jsonl")
    ...     spec = {"base_model": "smollm2-135m-instruct", "dataset": dataset["id"], "max_steps": 100}
    ...     job = swarm.submit_lora(spec)
    ...     for job in swarm.follow(job["id"]):
    ...         print(job["state"], job["progress"])
    ...     swarm.download_result(job["id"], "adapters/mine")
    """

    def __init__(
        self,
        coordinator: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(coordinator, api_key, timeout=timeout, transport=transport)

    def models(self) -> list[dict]:
        return self._request("GET", "/api/models")

    def upload_file(
        self, path: str | os.PathLike, *, purpose: str = "dataset", progress: Progress | None = None
    ) -> dict:
        """Upload a file (resuming after dropped connections) and return its `File`.

        `progress(bytes_done, bytes_total)` is called as chunks are accepted.
        """
        path = Path(path)
        upload = self._upload(path, {"filename": path.name, "purpose": purpose}, progress)
        if upload.file is None:
            upload = self._fetch_upload(f"/api/uploads/{quote(upload.upload_id, safe='')}")
        if upload.file is None:
            raise SwarmError(f"the coordinator stored {path.name} but did not say under which file id")
        return upload.file

    def files(self) -> list[dict]:
        return self._request("GET", "/api/files")

    def file(self, file_id: str) -> dict:
        return self._request("GET", f"/api/files/{_segment(file_id)}", not_found=f"file {file_id} not found")

    def submit_lora(self, spec: dict | BaseModel, *, max_attempts: int | None = None) -> dict:
        """Submit a LoRA job; `spec` holds LoraJobSpec fields with `dataset` set to a file id and
        `base_model` to a catalogue name. The price is held in escrow; returns the `Job`."""
        return self._submit("lora", spec, max_attempts)

    def submit_inference(self, spec: dict | BaseModel, *, max_attempts: int | None = None) -> dict:
        """Submit a batch inference job; `spec` holds InferenceJobSpec fields with `dataset` set to the
        id of a file uploaded with purpose "prompts" and `base_model` to a catalogue name or one of
        your `ft:` models. Its most possible price is held in escrow and what it does not use comes
        back; the result (`download_result`) holds completions.jsonl, one answer per prompt."""
        return self._submit("inference", spec, max_attempts)

    def _submit(self, kind: str, spec: dict | BaseModel, max_attempts: int | None) -> dict:
        if isinstance(spec, BaseModel):
            spec = spec.model_dump(mode="json", exclude_none=True)
        body: dict[str, Any] = {"spec": {**spec, "type": kind}}
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        dataset = spec.get("dataset")
        return self._request("POST", "/api/jobs", json=body, not_found=f"file {dataset} not found")

    def jobs(self, state: str | None = None) -> list[dict]:
        return self._request("GET", "/api/jobs", params={"state": state} if state else None)

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/api/jobs/{_segment(job_id)}", not_found=f"job {job_id} not found")

    def cancel(self, job_id: str) -> dict:
        return self._request(
            "POST", f"/api/jobs/{_segment(job_id)}/cancel", not_found=f"job {job_id} not found"
        )

    def follow(self, job_id: str, *, interval: float = 1.0) -> Iterator[dict]:
        """Yield the `Job` now and each time it changes, until it reaches a final state.

        A dropped connection or a restarting coordinator is waited out (see `retry_delays`).
        """
        previous: dict | None = None
        setbacks = 0
        while True:
            try:
                job = self.job(job_id)
            except SwarmError as error:
                if error.status_code is not None and error.status_code not in _RETRYABLE_STATUS:
                    raise
                setbacks += 1
                self._pause(setbacks, error)
                continue
            setbacks = 0
            if job != previous:
                yield job
                previous = job
            if job["state"] in FINAL_JOB_STATES:
                return
            time.sleep(interval)

    # ---- sweeps

    def submit_sweep(self, spec: dict) -> dict:
        """Queue a sweep (compute_swarm.sweeps.SweepSpec as JSON): every trial or, if one is refused or
        a cost cap is passed, none. Returns the sweep as `sweep_status` does."""
        dataset = spec.get("base", {}).get("dataset")
        return self._request(
            "POST", "/api/sweeps", json={"spec": spec}, not_found=f"file {dataset} not found"
        )

    def sweep_status(self, sweep_id: str) -> dict:
        """The sweep: `state` (running, completed), a row per trial (`trials`), `best`, `cost_micro`."""
        return self._request(
            "GET", f"/api/sweeps/{_segment(sweep_id)}", not_found=f"sweep {sweep_id} not found"
        )

    def cancel_sweep(self, sweep_id: str) -> dict:
        return self._request(
            "POST", f"/api/sweeps/{_segment(sweep_id)}/cancel", not_found=f"sweep {sweep_id} not found"
        )

    def sweep(
        self,
        spec: dict | None = None,
        *,
        sweep_id: str | None = None,
        wait: bool = True,
        interval: float = 2.0,
        on_update: Callable[[dict], None] | None = None,
    ):
        """Run a sweep (or follow one already submitted, by sweep_id) and return its trials as a table:
        a pandas DataFrame when pandas is installed (the sweep itself in `.attrs["sweep"]`), else a
        SweepTable, which Jupyter shows as a table too. With wait, returns once every trial finished."""
        if (spec is None) == (sweep_id is None):
            raise ValueError("give a sweep spec to run, or the sweep_id of one to follow")
        status = self.submit_sweep(spec) if spec is not None else self.sweep_status(sweep_id)
        setbacks = 0
        while wait and status["state"] == "running":
            if on_update is not None:
                on_update(status)
            time.sleep(interval)
            try:
                status = self.sweep_status(status["id"])
                setbacks = 0
            except SwarmError as error:
                if error.status_code is not None and error.status_code not in _RETRYABLE_STATUS:
                    raise
                setbacks += 1
                self._pause(setbacks, error)
        return sweep_table(status)

    def download_result(
        self, job_id: str, directory: str | os.PathLike, *, progress: Progress | None = None
    ) -> Path:
        """Download a completed job's result (a LoRA job's adapter, a batch's completions.jsonl), verify
        it and unpack it into `directory` (which must not exist or be empty). An interrupted download resumes where it stopped when called again."""
        directory = Path(directory)
        job = self.job(job_id)
        if job["state"] not in SUCCESSFUL_STATES:
            raise SwarmError(f"job {job_id} is {job['state']}: only a completed job has a result to download")
        if not job.get("result_sha256"):
            raise SwarmError(f"job {job_id} is {job['state']} but the coordinator lists no result for it")
        try:
            _refuse_non_empty(directory)
        except FileExistsError as error:
            raise SwarmError(f"{error}: choose another directory") from None
        archive = directory.with_name(directory.name + ".tar")
        self._download(
            f"/api/jobs/{_segment(job_id)}/result",
            archive,
            job["result_sha256"],
            what=f"job {job_id}'s result",
            not_found=f"job {job_id} has no result to download yet",
            progress=progress,
        )
        unpack_archive(archive, directory)
        archive.unlink()
        return directory

    def receipt(self, job_id: str) -> dict:
        """What ran, on which nodes, how verification ended, and the money the job moved."""
        return self._request(
            "GET", f"/api/jobs/{quote(job_id, safe='')}/receipt", not_found=f"no job {job_id}"
        )

    def balance(self) -> dict:
        return self._request("GET", "/api/balance")

    def ledger(self, limit: int = 100) -> list[dict]:
        return self._request("GET", "/api/ledger", params={"limit": limit})


# ---- nodes


class NodeClient(_CoordinatorSession):
    """What the node agent asks of the coordinator over HTTP: registration, its earnings, and the
    artifacts (datasets, checkpoints, results) of the jobs it holds."""

    _credential_name = "node token"

    def __init__(
        self,
        coordinator: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(coordinator, token, timeout=timeout, transport=transport)

    @staticmethod
    def register(
        coordinator: str,
        name: str,
        *,
        invite_code: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> tuple[str, str]:
        """Register a new node; returns (node_id, token). The token is shown this once: keep it. Where
        the coordinator admits nodes by invitation, give its operators' invite code."""
        body = {"name": name} if invite_code is None else {"name": name, "invite_code": invite_code}
        with _CoordinatorSession(coordinator, None, timeout=timeout, transport=transport) as session:
            answer = session._request("POST", "/api/nodes/register", json=body)
        return answer["node_id"], answer["token"]

    def me(self) -> dict:
        return self._request("GET", "/api/nodes/me")

    @staticmethod
    def market_figures(
        coordinator: str, *, timeout: float = 15.0, transport: httpx.BaseTransport | None = None
    ) -> dict:
        """The coordinator's market figures by hardware class (public: `compute_swarm.market`)."""
        with _CoordinatorSession(coordinator, None, timeout=timeout, transport=transport) as session:
            return session._request("GET", "/api/market")

    def transfer_offer(self, sha256: str, *, holding: bool = False) -> TransferOffer:
        """How to fetch an artifact from peers, or (`holding`) serve it to them
        (compute_swarm.swarm_transfer). SwarmError with status_code 404 where the coordinator has peer
        transfer off or the node may not read it."""
        if not _is_sha256(sha256):
            raise ValueError(f"{sha256!r} is not a sha256 hex digest")
        answer = self._request(
            "GET",
            f"/api/swarm/{sha256}/offer",
            params={"holding": "true"} if holding else None,
            not_found=f"artifact {sha256} is not offered to this node by peer transfer",
        )
        try:
            return TransferOffer.model_validate(answer)
        except ValueError as error:
            raise SwarmError(f"the coordinator's transfer offer is malformed: {error}") from None

    def payouts(self) -> dict:
        """`{"earnings", "minimum_micro", "currency", "value_micro_per_credit", "payouts": [...]}`: this
        node's payouts, newest first, and what a payout may be."""
        return self._request("GET", "/api/nodes/me/payouts")

    def request_payout(
        self, payee: str, *, amount_micro: int | None = None, request_key: str | None = None
    ) -> dict:
        """Ask to be paid `amount_micro` (default: all available) at `payee`. Keep `request_key` to retry
        a request whose answer was lost: the same key answers with the same payout, never a second one."""
        body = {
            "payee": payee,
            "request_key": request_key or f"payout-{secrets.token_hex(12)}",
            "amount_micro": amount_micro,
        }
        return self._request("POST", "/api/nodes/me/payouts", json=body)

    def receipt(self, job_id: str) -> dict:
        """The receipt of a job this node ran or re-ran: the same one its buyer reads."""
        return self._request(
            "GET",
            f"/api/nodes/me/jobs/{quote(job_id, safe='')}/receipt",
            not_found=f"no job {job_id} ran here",
        )

    def earnings_history(self, days: int = 30) -> dict:
        """The last `days` days (1 to 60) of credits for work, per UTC hour, with the balances and the
        all-time total: `{"earnings", "since", "hourly": [{"hour_start", "credited_micro"}],
        "total_credited_micro"}`. Hours are UTC so the caller can group them into its local days."""
        return self._request("GET", "/api/nodes/me/earnings", params={"days": days})

    def upload_artifact(self, path: str | os.PathLike, *, purpose: str, job_id: str, lease_id: str) -> str:
        """Upload a checkpoint or result for the job this node holds; returns its sha256."""
        upload = self._upload(Path(path), {"purpose": purpose, "job_id": job_id, "lease_id": lease_id}, None)
        return upload.sha256

    def download_artifact(self, sha256: str, destination: Path, *, size: int | None = None) -> Path:
        """Fetch an artifact to `destination`, resuming from `destination.with_suffix(".partial")`,
        verified against `sha256` and renamed into place only once it is whole. `size`, the size the
        lease states: past it the download stops, is discarded, and DownloadTooLarge is raised."""
        if not _is_sha256(sha256):
            raise ValueError(f"{sha256!r} is not a sha256 hex digest")
        return self._download(
            f"/api/artifacts/{sha256}",
            Path(destination),
            sha256,
            what=f"artifact {sha256[:12]}",
            not_found=f"artifact {sha256} not found, or not part of a job this node holds",
            size=size,
        )


# ---- helpers


def _normalise_address(coordinator: str) -> str:
    address = coordinator.strip().rstrip("/")
    if not address.startswith(("http://", "https://")):
        raise SwarmError(f"the coordinator address {coordinator!r} must start with http:// or https://")
    return address


def _segment(identifier: str) -> str:
    """An id as one URL path segment, so no id can reach another route."""
    return quote(str(identifier), safe="")


def _is_sha256(text: str) -> bool:
    return re.fullmatch(SHA256_PATTERN, text) is not None


def _detail_of(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", "")
    except (ValueError, AttributeError):
        return response.text.strip()[:300]
    if isinstance(detail, list):  # FastAPI's request validation errors
        return "; ".join(_describe_problem(problem) for problem in detail)
    return str(detail)


def _describe_problem(problem: Any) -> str:
    if not isinstance(problem, dict):
        return str(problem)
    where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "request"
    return f"{where}: {problem.get('msg', '')}"


def _content_range(response: httpx.Response) -> tuple[int, int | None]:
    """(first byte, total size) of a 200/206 answer, from Content-Range or Content-Length."""
    header = response.headers.get("Content-Range", "")
    if response.status_code == 206 and header.startswith("bytes "):
        span, _, total = header[len("bytes ") :].partition("/")
        first = int(span.partition("-")[0])
        return first, int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None
