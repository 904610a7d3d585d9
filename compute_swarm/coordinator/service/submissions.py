"""Buyers' jobs in the database: quotes, submissions (one job, or a sweep's trials all or none) and
cancellation. Each submission holds the job's price in escrow in the same transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm.coordinator.domain import lifecycle, pricing
from compute_swarm.coordinator.domain.scheduler import (
    NodeSnapshot,
    QueuedJob,
    download_bytes,
    inference_memory_bytes,
    queued_job,
    required_memory_bytes,
)
from compute_swarm.coordinator.service import accounts, batch, trials
from compute_swarm.coordinator.service.catalogue import Catalogue, CatalogueError
from compute_swarm.coordinator.service.inference import InferenceError, resolve_model
from compute_swarm.coordinator.service.leases import Grant, Leases
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.job_changes import change
from compute_swarm.coordinator.store.tables import Buyer, File, Job, Sweep
from compute_swarm.engine.jobs import InferenceJobSpec, LoraJobSpec, parse_buyer_spec


class JobError(Exception):
    """A request about a job that cannot be met; status_code is the HTTP answer. `fields` names the
    spec fields at fault, each with its problem, so a form can show each next to its field."""

    def __init__(self, message: str, status_code: int = 400, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.fields = fields or {}


@dataclass(frozen=True)
class Quote:
    """What a job would cost and need, before it is submitted."""

    spec: LoraJobSpec | InferenceJobSpec
    base_model: str
    dataset: File
    price_micro: int
    required_memory_bytes: int
    required_memory_bytes_16bit: int
    input_adapter_sha256: str | None


class Reservation(Protocol):
    """A free node's slot set aside for a job being submitted."""

    snapshot: NodeSnapshot  # the node as it was when reserved


class Placement(Protocol):
    """Where a job being submitted may start at once (the hub's dispatcher), on the event loop."""

    def reserve(self, job: QueuedJob) -> Reservation | None:
        """A free node's slot for a job with these needs, or None: it waits in the queue."""

    def hand_over(self, reservation: Reservation, grant: Grant | None) -> None:
        """The submission committed with this lease, or without one (or failed): free the slot, send
        the lease."""


class Submissions:
    def __init__(
        self,
        database: Database,
        settings: Settings,
        catalogue: Catalogue | None = None,
        *,
        leases: Leases | None = None,
        placement: Placement | None = None,
    ):
        self.database = database
        self.settings = settings
        self.catalogue = catalogue or Catalogue(database)
        self.leases = leases
        self.placement = placement

    def submit(
        self, buyer_id: str, spec_data: Any, max_attempts: int | None, *, model_suffix: str | None = None
    ) -> Job:
        """Queue a LoRA fine-tune (the default type) or a batch inference job, holding its price."""
        # Committed with the other submissions of the moment (one fsync for all): the job is durable
        # when this returns, as with a transaction of its own.
        return self.database.grouped(self._queueing(buyer_id, spec_data, max_attempts, model_suffix))

    async def submit_async(
        self, buyer_id: str, spec_data: Any, max_attempts: int | None, *, model_suffix: str | None = None
    ) -> Job:
        """`submit` for the event loop, which runs on while the job waits for its group's commit. When
        nothing queued waits before it and a free node takes it, the job is leased to that node in the
        same transaction, and the lease is sent as that commits: no dispatch round, no second commit."""
        queueing = self._queueing(buyer_id, spec_data, max_attempts, model_suffix)
        reservation = self._reserve(queueing.spec)
        if reservation is None:
            return await self.database.grouped_async(queueing)
        placement, leases = self.placement, self.leases
        assert placement is not None and leases is not None
        granted: Grant | None = None  # the lease the work's last run wrote (a group may run it twice)

        def queue_and_lease(session: Session) -> Job:
            nonlocal granted
            granted = None
            job = queueing(session)
            granted = leases.lease_on_submission(session, job, reservation.snapshot)
            return job

        return await self.database.grouped_async(
            queue_and_lease,
            when_done=lambda committed: placement.hand_over(reservation, granted if committed else None),
        )

    def _reserve(self, spec: LoraJobSpec | InferenceJobSpec) -> Reservation | None:
        if self.placement is None or self.leases is None:
            return None
        needs = self._needs(spec)
        return None if needs is None else self.placement.reserve(needs)

    def _needs(self, spec: LoraJobSpec | InferenceJobSpec) -> QueuedJob | None:
        """What the job will ask of a node, from the catalogue as it was last read (so the event loop
        may ask): the guess a node is reserved by, checked against the job's real figures as it is
        leased. None for a model the catalogue cannot tell (an ft: model)."""
        model = self.catalogue.cached(spec.base_model)
        if model is None:
            return None
        if isinstance(spec, LoraJobSpec):
            return queued_job("", spec, model, queued_at=time.time())
        memory = inference_memory_bytes(model)
        return QueuedJob(
            job_id="",
            base_model=model.name,
            required_memory_bytes=memory,
            required_memory_bytes_16bit=memory,
            queued_at=time.time(),
            inference=True,
            model_bytes=download_bytes(model, lora=False),
        )

    def _queueing(
        self, buyer_id: str, spec_data: Any, max_attempts: int | None, model_suffix: str | None
    ) -> _Queueing:
        """The work of queueing one job, its request checked first (a refusal raises here)."""
        attempts = self.attempts(max_attempts)
        spec = parse_spec(spec_data)
        return _Queueing(self, buyer_id, spec, attempts, model_suffix)

    def attempts(self, max_attempts: int | None) -> int:
        attempts = max_attempts if max_attempts is not None else self.settings.default_max_attempts
        if not 1 <= attempts <= 20:
            raise JobError("max_attempts must be between 1 and 20", 422, {"max_attempts": "1 to 20"})
        return attempts

    def queue_in(
        self,
        session: Session,
        buyer_id: str,
        spec: LoraJobSpec | InferenceJobSpec,
        attempts: int,
        *,
        model_suffix: str | None = None,
        sweep_id: str | None = None,
        sweep_parameters: dict | None = None,
        price_cap_micro: int | None = None,
    ) -> Job:
        """Queue one job in the caller's transaction, holding its price (at most price_cap_micro)."""
        # One submission at a time per buyer reads and spends the balance. PostgreSQL runs transactions
        # side by side: the buyer's row is locked first, before the job row's foreign key takes a
        # weaker lock on it. SQLite's BEGIN IMMEDIATE serializes them already.
        if not self.database.is_sqlite:
            session.scalar(select(Buyer.id).where(Buyer.id == buyer_id).with_for_update())
        quote = _quote(session, buyer_id, spec, self.catalogue)
        if price_cap_micro is not None and quote.price_micro > price_cap_micro:
            raise JobError(
                f"this costs {ledger.format_credits(quote.price_micro)} credits, more than the "
                f"{ledger.format_credits(price_cap_micro)} allowed",
                422,
            )
        now = time.time()
        job = Job(
            id=accounts.new_id("job"),
            buyer_id=buyer_id,
            kind=spec.type,
            spec=spec.model_dump(mode="json", exclude_none=isinstance(spec, InferenceJobSpec)),
            base_model=quote.base_model,
            dataset_sha256=quote.dataset.sha256,
            dataset_size=quote.dataset.size,
            dataset_lines=quote.dataset.lines,
            required_memory_bytes=quote.required_memory_bytes,
            required_memory_bytes_16bit=quote.required_memory_bytes_16bit,
            price_micro=quote.price_micro,
            max_attempts=attempts,
            excluded_nodes=[],
            input_adapter_sha256=quote.input_adapter_sha256,
            model_suffix=model_suffix,
            sweep_id=sweep_id,
            sweep_parameters=sweep_parameters,
            created_at=now,
            updated_at=now,
        )
        held = f"submitted; {ledger.format_credits(quote.price_micro)} credits held in escrow"
        try:
            change(session, job, lifecycle.Submitted(now, held))
        except ledger.InsufficientCredits as error:
            raise JobError(str(error), 402) from None
        return job

    def submit_sweep(self, buyer_id: str, spec_data: Any) -> tuple[Sweep, list[Job]]:
        """Queue a sweep's trials, all of them or (a trial refused, a cap passed) none."""
        spec = trials.parse(spec_data)
        specs = trials.trial_specs(spec)
        with self.database.transaction() as session:
            sweep = Sweep(
                id=accounts.new_id("sweep"),
                buyer_id=buyer_id,
                spec=spec.model_dump(mode="json"),
                created_at=time.time(),
            )
            session.add(sweep)
            session.flush()
            queued: list[Job] = []
            for number, (data, values) in enumerate(specs, 1):
                settings = ", ".join(f"{name}={value}" for name, value in values.items())
                try:
                    queued.append(
                        self.queue_in(
                            session,
                            buyer_id,
                            parse_spec(data),
                            self.attempts(None),
                            model_suffix=f"trial{number}",
                            sweep_id=sweep.id,
                            sweep_parameters=values,
                            price_cap_micro=spec.max_price_per_trial_micro,
                        )
                    )
                except JobError as error:
                    raise trials.SweepError(
                        f"trial {number} ({settings}): {error}", error.status_code
                    ) from None
            total = sum(trial.price_micro for trial in queued)
            if spec.max_total_price_micro is not None and total > spec.max_total_price_micro:
                raise trials.SweepError(
                    f"the {len(queued)} trials cost {ledger.format_credits(total)} credits, more than the "
                    f"{ledger.format_credits(spec.max_total_price_micro)} allowed in total"
                )
            return sweep, queued

    def quote(self, buyer_id: str, spec_data: Any) -> tuple[Quote, int]:
        """What submitting this spec would hold, and the buyer's available balance, changing nothing."""
        spec = parse_spec(spec_data)
        with self.database.reading() as session:
            return _quote(session, buyer_id, spec, self.catalogue), ledger.balance(
                session, ledger.buyer_account(buyer_id)
            )

    def cancel(self, job_id: str) -> Job:
        """Cancel a job (its owner was checked by the caller) and refund its escrow; its node, if one
        runs it, is told to stop once this commits."""
        with self.database.transaction() as session:
            job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is None:
                raise JobError(f"no job {job_id!r}", 404)
            try:
                change(session, job, lifecycle.Cancelled(time.time()))
            except lifecycle.NotAllowed as error:
                raise JobError(str(error), 409) from None
            return job

    def cancel_sweep(self, sweep_id: str) -> int:
        """Cancel every trial of a sweep still open (their escrow comes back); finished trials stay as
        they are. Returns how many were cancelled."""
        with self.database.reading() as session:
            open_trials = session.scalars(
                select(Job.id).where(Job.sweep_id == sweep_id, Job.state.in_(lifecycle.OPEN_STATES))
            ).all()
        cancelled = 0
        for job_id in open_trials:
            try:
                self.cancel(job_id)
                cancelled += 1
            except JobError:
                pass  # it finished meanwhile
        return cancelled


@dataclass(frozen=True)
class _Queueing:
    """The work of queueing one checked job request, in the session it is given."""

    submissions: Submissions
    buyer_id: str
    spec: LoraJobSpec | InferenceJobSpec
    attempts: int
    model_suffix: str | None

    def __call__(self, session: Session) -> Job:
        return self.submissions.queue_in(
            session, self.buyer_id, self.spec, self.attempts, model_suffix=self.model_suffix
        )


def parse_spec(spec_data: Any) -> LoraJobSpec | InferenceJobSpec:
    """A buyer's spec, validated: the coordinator's one check of it (a lease's spec is built from it)."""
    if not isinstance(spec_data, dict):
        raise JobError("spec must be a JSON object", 422)
    try:
        spec = parse_buyer_spec({"type": "lora", **spec_data})
    except ValidationError as error:
        raise JobError(_describe(error), 422, _fields(error)) from None
    if isinstance(spec, InferenceJobSpec) and spec.adapter is not None:
        raise JobError(
            "adapter is chosen by the model: give base_model an ft: model id instead",
            422,
            {"adapter": "not allowed"},
        )
    if isinstance(spec, LoraJobSpec) and spec.evaluate_adapter is not None:
        raise JobError(
            "evaluate_adapter is set by the coordinator for verification re-runs only",
            422,
            {"evaluate_adapter": "not allowed"},
        )
    return spec


def _quote(
    session: Session, buyer_id: str, spec: LoraJobSpec | InferenceJobSpec, catalogue: Catalogue
) -> Quote:
    if isinstance(spec, LoraJobSpec):
        try:
            model = catalogue.for_fine_tuning(spec.base_model)
        except CatalogueError as error:
            raise JobError(str(error), 422, {"base_model": "not offered for fine-tuning here"}) from None
    purpose = "prompts" if isinstance(spec, InferenceJobSpec) else "dataset"
    dataset = _file(session, spec.dataset)
    if dataset is None or dataset.buyer_id != buyer_id or dataset.purpose != purpose:
        raise JobError(
            f"no {purpose} file {spec.dataset!r}: upload it with purpose {purpose!r} first and give its file id",
            422,
            {"dataset": f"choose one of your {purpose} files"},
        )
    if isinstance(spec, InferenceJobSpec):
        try:
            served = resolve_model(session, buyer_id, spec.base_model, catalogue)
        except InferenceError as error:
            raise JobError(str(error), 422, {"base_model": str(error)}) from None
        memory = inference_memory_bytes(served.base, served.adapter_size)
        return Quote(
            spec=spec,
            base_model=served.base.name,
            dataset=dataset,
            price_micro=batch.hold_micro(served.base, spec, dataset.size, dataset.lines),
            required_memory_bytes=memory,
            required_memory_bytes_16bit=memory,
            input_adapter_sha256=served.adapter_sha256,
        )
    try:
        price = pricing.price_micro(spec, model, dataset.lines)
    except ValueError as error:
        raise JobError(str(error), 422) from None
    return Quote(
        spec=spec,
        base_model=model.name,
        dataset=dataset,
        price_micro=price,
        required_memory_bytes=required_memory_bytes(spec, model, backend="cpu"),
        required_memory_bytes_16bit=required_memory_bytes(spec, model, backend="cuda"),
        input_adapter_sha256=None,
    )


def _file(session: Session, file_id: str) -> File | None:
    """A file, read once per transaction: a group commit's submissions often name the same dataset."""
    files = session.info.setdefault(_FILES_READ, {})
    if file_id not in files:
        files[file_id] = session.get(File, file_id)
    return files[file_id]


_FILES_READ = "compute_swarm.files_read"  # Session.info key


def _fields(error: ValidationError) -> dict[str, str]:
    """Each faulty top-level field with its first problem."""
    fields: dict[str, str] = {}
    for problem in error.errors():
        location = [str(part) for part in problem["loc"] if part not in ("lora", "inference")]
        if location:
            fields.setdefault(location[0], problem["msg"].removeprefix("Value error, "))
    return fields


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'spec'}: {problem['msg'].removeprefix('Value error, ')}"
        for problem in error.errors()
    )
