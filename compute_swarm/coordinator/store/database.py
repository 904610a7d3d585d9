"""The database: one engine per coordinator, sessions that commit or roll back as a unit, migrations.

SQLite (the default) runs in WAL mode with synchronous=FULL, so a committed transaction survives a
power cut, and every transaction takes the write lock up front (BEGIN IMMEDIATE): read-modify-write
steps such as settling a job are serialized and never fail half-way on a lock upgrade.

Small writes that arrive together (submissions, a dispatch round's leases, nodes' hellos) commit in
groups (`Database.grouped`, and `grouped_async` for the event loop): on SQLite each commit is an fsync,
and one fsync for many keeps the rate of accepted work from being the disk's rate of fsyncs. One
writer thread commits the groups, so a request on the event loop waits for its commit without a
thread of its own. Each caller still returns only once its work is committed, and one caller's
failure rolls back its own work only.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
Result = TypeVar("Result")


class UnstorableText(ValueError):
    """Text with a NUL character, from a request: PostgreSQL cannot store (or even compare) it, and
    SQLite could. Refused on both, so a buyer's or a node's input is answered the same everywhere (a
    400 from the API, not a 500 on one database only)."""


# Session.info key: what a transaction queued for after its commit (coordinator.domain.effects).
AFTER_COMMIT = "compute_swarm.after_commit"


def after_commit(session: Session, *items: Any) -> None:
    """Queue items (coordinator.domain.effects) for the database's on_commit, once `session` commits."""
    session.info.setdefault(AFTER_COMMIT, []).extend(items)


def withdraw_after_commit(session: Session, item: Any) -> None:
    """Take back one item queued with after_commit (one equal to `item`), if it is queued."""
    queued = session.info.get(AFTER_COMMIT, [])
    if item in queued:
        queued.remove(item)


@dataclass
class _GroupMember:
    """One caller's work waiting for a group commit, and, once the group committed, its outcome: a
    thread waits on `done`, a coroutine on `future`."""

    work: Callable[[Session], Any]
    done: threading.Event | None = None
    future: asyncio.Future | None = None
    result: Any = None
    error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class Database:
    def __init__(self, url: str):
        self.url = url
        # Given what each committed transaction queued under AFTER_COMMIT (the coordinator wires its hub
        # here); a rolled-back transaction's queue is dropped.
        self.on_commit: Callable[[list[Any]], None] = lambda _queued: None
        # Given the same queue inside the transaction, just before it commits: on PostgreSQL the
        # coordinator's replicas link (transport.replicas) sends it to the other coordinators with
        # NOTIFY, which PostgreSQL delivers if and when the transaction commits.
        self.before_commit: Callable[[Session, list[Any]], None] | None = None
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8, max_overflow=8
            )
            event.listen(self.engine, "connect", _configure_sqlite)
            event.listen(self.engine, "begin", _begin_immediate)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        # The same text is refused on both databases, before it reaches either (see UnstorableText).
        event.listen(self.engine, "before_cursor_execute", _refuse_nul_characters)
        if self.is_sqlite:
            # After the check above: a statement it refused never ran, so wrote nothing.
            event.listen(self.engine, "before_cursor_execute", _count_writes)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        # Group commit: callers queue here, and the writer thread commits all that queued while it
        # committed the group before, then wakes them.
        self._group_changed = threading.Condition()
        self._group_waiting: list[_GroupMember] = []
        self._writer: threading.Thread | None = None
        self._closing = False
        self.groups_committed = 0  # read by tests: commits that served grouped work
        # Reads take no write lock: in WAL mode they see the last commit while writers go on.
        self._read_sessions = sessionmaker(
            self.engine.execution_options(read_only=True), expire_on_commit=False
        )

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits together when the block ends, or not at all."""
        # SQLite has one writer at a time; its busy handler makes waiting writers poll with sleeps of
        # up to 100 ms. Queueing them on a lock in this process instead hands the database over at once.
        with self._write_lock, self._sessions() as session:
            with session.begin():
                yield session
                if self.before_commit is not None and session.info.get(AFTER_COMMIT):
                    self.before_commit(session, session.info[AFTER_COMMIT])
            queued = session.info.pop(AFTER_COMMIT, [])
        if queued:
            self.on_commit(queued)

    def grouped(self, work: Callable[[Session], Result]) -> Result:
        """Run `work` in a transaction shared with other callers' work, and return what it returned once
        that transaction committed (or raise what it raised, its own changes rolled back).

        On SQLite the waiting callers' work runs in one transaction and commits with one fsync
        (`_commit_group` tells how one caller's failure is kept from the others). PostgreSQL already
        flushes concurrent commits together, and one long transaction would hold each caller's row
        locks for the whole group: there each work commits in a transaction of its own. Work runs on the writer thread, so it must use only the session
        it is given (never `transaction()` itself)."""
        if not self.is_sqlite:
            return self._alone(work)
        member = _GroupMember(work, done=threading.Event())
        self._queue(member)
        member.done.wait()
        return member.outcome()

    async def grouped_async(
        self, work: Callable[[Session], Result], when_done: Callable[[bool], None] | None = None
    ) -> Result:
        """`grouped` for a coroutine: the event loop runs on while the work waits for its commit. A
        caller cancelled meanwhile (its client went away) does not stop the work: it commits or not
        with its group, as it would have, and `when_done` is called on the event loop then, with
        whether it committed, cancelled caller or not."""
        if self.is_sqlite:
            member = _GroupMember(work, future=asyncio.get_running_loop().create_future())
            self._queue(member)
            finished, outcome = member.future, member.outcome
        else:
            finished = asyncio.ensure_future(asyncio.to_thread(self._alone, work))
            outcome = finished.result
        if when_done is not None:
            finished.add_done_callback(lambda _: when_done(_succeeds(outcome)))
        await asyncio.shield(finished)
        return outcome()

    def _alone(self, work: Callable[[Session], Result]) -> Result:
        with self.transaction() as session:
            return work(session)

    def _queue(self, member: _GroupMember) -> None:
        with self._group_changed:
            if self._closing:
                raise RuntimeError("the database is closed")
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_groups, name="group-commit", daemon=True)
                self._writer.start()
            self._group_waiting.append(member)
            self._group_changed.notify()

    def _write_groups(self) -> None:
        while True:
            with self._group_changed:
                while not self._group_waiting and not self._closing:
                    self._group_changed.wait()
                if not self._group_waiting:
                    return
                group, self._group_waiting = self._group_waiting, []
            try:
                self._commit_group(group)
            finally:
                _wake(group)

    def _commit_group(self, group: list[_GroupMember]) -> None:
        """Commit the group's work in one transaction. A savepoint per member would cost more than most
        members' work, so there is none: a member that fails before it wrote anything (a refusal: a
        submission its buyer cannot pay for) just fails, and one that fails after writing rolls the
        transaction back, and the others run again without it."""
        running = group
        try:
            while running:
                for member in running:
                    member.result, member.error = None, None
                failed_after_writing = self._try_group(running)
                if failed_after_writing is None:
                    self.groups_committed += 1
                    return
                running = [member for member in running if member is not failed_after_writing]
        except BaseException as error:
            # The commit itself failed (a full disk, a lost connection): nobody's work is durable. Each
            # caller raises it on its own thread; the writer thread goes on with the next group.
            for member in running:
                if member.error is None:
                    member.result, member.error = None, error

    def _try_group(self, group: list[_GroupMember]) -> _GroupMember | None:
        """Run the group's work in one transaction and commit it; or, when a member failed after it
        wrote, roll back and return that member (its error kept)."""
        failed_after_writing: _GroupMember | None = None
        with contextlib.suppress(_RollBack), self.transaction() as session:
            connection = session.connection()
            effects = session.info.setdefault(AFTER_COMMIT, [])
            for member in group:
                effects_before, writes_before = len(effects), connection.info.get(_WRITES, 0)
                try:
                    member.result = member.work(session)
                    session.flush()  # what it left pending is written as its own, not as the next member's
                except Exception as error:
                    member.error = error
                    del effects[effects_before:]  # its effects go with its work
                    if (
                        connection.info.get(_WRITES, 0) != writes_before
                        or session.new
                        or session.dirty
                        or session.deleted
                    ):
                        failed_after_writing = member
                        raise _RollBack from None
        return failed_after_writing

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only: it never waits for writers (and must not write)."""
        with self._read_sessions() as session, session.begin():
            yield session

    def shared_secret(self, name: str) -> str:
        """A random secret made up the first time any coordinator on this database asks for it, and the
        same for every replica after (tables.CoordinatorSecret)."""
        from compute_swarm.coordinator.store.tables import CoordinatorSecret

        insert = (sqlite_insert if self.is_sqlite else postgresql_insert)(CoordinatorSecret)
        with self.transaction() as session:
            # Two replicas starting together: one insert wins, and both read what it wrote.
            session.execute(
                insert.values(
                    name=name, value=secrets.token_urlsafe(48), created_at=time.time()
                ).on_conflict_do_nothing(index_elements=["name"])
            )
            return session.get_one(CoordinatorSecret, name).value

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (a no-op when it is there already)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["engine"] = self.engine
        command.upgrade(config, "head")

    def close(self) -> None:
        with self._group_changed:
            self._closing = True
            self._group_changed.notify()
            writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(30)  # the groups queued before are committed first
        self.engine.dispose()


def _wake(group: list[_GroupMember]) -> None:
    """Hand each member of a committed (or failed) group its outcome: threads at once, coroutines with
    one call into each event loop."""
    waiting_on_loops: dict[asyncio.AbstractEventLoop, list[_GroupMember]] = {}
    for member in group:
        if member.done is not None:
            member.done.set()
        elif member.future is not None:
            waiting_on_loops.setdefault(member.future.get_loop(), []).append(member)
    for loop, members in waiting_on_loops.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, members)


def _succeeds(outcome: Callable[[], Any]) -> bool:
    try:
        outcome()
    except BaseException:
        return False
    return True


def _resolve(members: list[_GroupMember]) -> None:
    for member in members:
        if member.future is not None and not member.future.done():
            member.future.set_result(None)


def _configure_sqlite(connection, _record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own transaction handling would
    # start transactions lazily and in DEFERRED mode).
    connection.isolation_level = None
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _begin_immediate(connection) -> None:
    read_only = connection.get_execution_options().get("read_only", False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


class _RollBack(Exception):
    """Raised inside a group's transaction to roll it back (Database._try_group)."""


# Connection.info key: how many statements other than reads the connection ran (Database._try_group).
_WRITES = "compute_swarm.writes"


def _count_writes(connection, _cursor, statement, _parameters, _context, _executemany) -> None:
    if not statement.startswith("SELECT"):
        connection.info[_WRITES] = connection.info.get(_WRITES, 0) + 1


def _refuse_nul_characters(_connection, _cursor, _statement, parameters, _context, _executemany) -> None:
    # Parameters come as a dict, a tuple, or (executemany, SQLAlchemy's batched inserts) a list of
    # either, or a flat list of many rows' values: every string in them is looked at.
    pending = [parameters]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise UnstorableText("text may not contain NUL characters (\\u0000)")
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
