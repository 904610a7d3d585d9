"""`compute-swarm coordinator` and `compute-swarm admin ...`: running the service and ops' commands.

The buyer commands live in compute_swarm.sdk.buyer_cli (light: httpx only). Nothing heavy is imported
until a command runs, so `compute-swarm --help` works on a buyer's install.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

from compute_swarm.coordinator.transport.catalogue_cli import register_catalogue_commands
from compute_swarm.coordinator.transport.payouts_cli import register_payout_commands


def register_commands(subcommands: argparse._SubParsersAction) -> None:
    serve = subcommands.add_parser(
        "coordinator",
        help="run the coordinator service",
        description="Serve the coordinator: REST API, node websocket, scheduler and ledger.",
    )
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    _data_dir_option(serve)
    serve.set_defaults(handler=_serve)

    _register_tunnel_server(subcommands)

    admin = subcommands.add_parser("admin", help="ops commands on a coordinator's database")
    actions = admin.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = actions.add_parser(
        "create-buyer", help="create a buyer; prints the API key alone on the last line"
    )
    _data_dir_option(create)
    create.add_argument("--name", required=True)
    create.add_argument(
        "--credits", type=_credits, default=0, help="credits to grant at once (e.g. 100 or 2.5)"
    )
    create.set_defaults(handler=_create_buyer)

    grant = actions.add_parser("grant", help="grant credits to a buyer")
    _data_dir_option(grant)
    grant.add_argument("--buyer", required=True, help="the buyer's name")
    grant.add_argument("--credits", type=_credits, required=True)
    grant.add_argument(
        "--key", default=None, help="idempotency key: the same grant given twice with one key counts once"
    )
    grant.set_defaults(handler=_grant)

    list_nodes = actions.add_parser("nodes", help="list registered nodes")
    _data_dir_option(list_nodes)
    list_nodes.set_defaults(handler=_nodes)

    revoke = actions.add_parser(
        "revoke-node", help="revoke a node's token (it is disconnected within seconds)"
    )
    _data_dir_option(revoke)
    revoke.add_argument("node_id")
    revoke.set_defaults(handler=_revoke)

    trust = actions.add_parser(
        "trust-node", help="trust a node (one of ops' own machines) to verify others' jobs"
    )
    _data_dir_option(trust)
    trust.add_argument("node_id")
    trust.add_argument("--untrust", action="store_true", help="stop trusting it")
    trust.set_defaults(handler=_trust)

    lift = actions.add_parser(
        "lift-quarantine",
        help="let a quarantined node take jobs again (watched more closely than a new node)",
    )
    _data_dir_option(lift)
    lift.add_argument("node_id")
    lift.set_defaults(handler=_lift_quarantine)

    approve = actions.add_parser(
        "approve-node", help='let in a node waiting for approval (node_admission "approval")'
    )
    _data_dir_option(approve)
    approve.add_argument("node_id")
    approve.set_defaults(handler=_approve)

    invite = actions.add_parser(
        "create-invite",
        help='print an invite code nodes register with (node_admission "invite"); shown once',
    )
    _data_dir_option(invite)
    invite.add_argument("--uses", type=int, default=1, help="how many nodes may register with it (1)")
    invite.add_argument(
        "--hours", type=float, default=24 * 7, help="how long it is good for, in hours (a week)"
    )
    invite.add_argument("--note", default="", help="what it is for (who it went to)")
    invite.set_defaults(handler=_create_invite)

    register_payout_commands(actions, _data_dir_option, _settings, _database)
    register_catalogue_commands(actions, _data_dir_option, _settings, _database)

    local = subcommands.add_parser(
        "local-swarm",
        help="run a coordinator and one node on this machine",
        description="Start a coordinator and a local node (child processes), create a demo buyer, and print "
        "the URL, the buyer's API key and a ready-to-paste submit command. Ctrl-C stops both.",
    )
    local.add_argument("--data-dir", type=Path, default=Path(".swarm"), help="default: ./.swarm")
    local.add_argument("--host", default="127.0.0.1")
    local.add_argument("--port", type=int, default=8000)
    local.set_defaults(handler=_local_swarm)


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="database, artifacts and keys (default: the platform data dir; SWARM_DATA_DIR)",
    )


def _credits(text: str) -> int:
    """Credits as typed by a person ("2.5") to micro-credits, exactly (no float rounding)."""
    from compute_swarm.money import MoneyError, parse_micro

    try:
        return parse_micro(text, "credits")
    except MoneyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of credits like 100 or 2.5") from None


def _settings(arguments: argparse.Namespace, **overrides):
    from pydantic import ValidationError

    from compute_swarm.coordinator.settings import Settings

    values = {key: value for key, value in overrides.items() if value is not None}
    if arguments.data_dir is not None:
        values["data_dir"] = arguments.data_dir.expanduser().resolve()
    try:
        return Settings(**values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in error.errors())
        raise SystemExit(f"compute-swarm: invalid settings: {problems}") from None


def _database(arguments: argparse.Namespace):
    from compute_swarm.coordinator.store.database import Database

    settings = _settings(arguments)
    database = Database(settings.resolved_database_url)
    database.upgrade()
    if not database.is_sqlite:
        from compute_swarm.coordinator.transport.replicas import effects_sender

        database.before_commit = effects_sender(f"admin-{secrets.token_hex(4)}")
    return database


def _serve(arguments: argparse.Namespace) -> int:
    from compute_swarm.coordinator.app import serve

    settings = _settings(arguments, host=arguments.host, port=arguments.port)
    print(
        f"compute-swarm coordinator on http://{settings.host}:{settings.port} (data: {settings.data_dir})",
        file=sys.stderr,
    )
    serve(settings)
    return 0


def _local_swarm(arguments: argparse.Namespace) -> int:
    from compute_swarm.coordinator.local_swarm import run

    return run(arguments.data_dir, arguments.host, arguments.port)


def _create_buyer(arguments: argparse.Namespace) -> int:
    from compute_swarm.coordinator.service import accounts
    from compute_swarm.coordinator.store import ledger

    database = _database(arguments)
    try:
        with database.transaction() as session:
            buyer, api_key = accounts.create_buyer(session, arguments.name, arguments.credits)
    except accounts.AccountError as error:
        print(f"compute-swarm admin: {error}", file=sys.stderr)
        return 1
    print(f"Created buyer {buyer.name} ({buyer.id}) with {ledger.format_credits(arguments.credits)} credits.")
    print("Their API key, shown this once:")
    print(api_key)
    return 0


def _grant(arguments: argparse.Namespace) -> int:
    from compute_swarm.coordinator.service import accounts
    from compute_swarm.coordinator.store import ledger

    if arguments.credits <= 0:
        print("compute-swarm admin: grant a positive amount", file=sys.stderr)
        return 2
    database = _database(arguments)
    key = arguments.key or f"grant:{time.time_ns()}"
    try:
        with database.transaction() as session:
            buyer = accounts.buyer_by_name(session, arguments.buyer)
            granted = ledger.grant(
                session, buyer.id, arguments.credits, idempotency_key=f"admin:{key}", memo="admin grant"
            )
            balance = ledger.balance(session, ledger.buyer_account(buyer.id))
    except accounts.AccountError as error:
        print(f"compute-swarm admin: {error}", file=sys.stderr)
        return 1
    if not granted:
        print(f"A grant with key {arguments.key!r} was made already; nothing changed.", file=sys.stderr)
    print(f"{buyer.name} now has {ledger.format_credits(balance)} credits.")
    return 0


def _nodes(arguments: argparse.Namespace) -> int:
    from sqlalchemy import select

    from compute_swarm.coordinator.store import ledger
    from compute_swarm.coordinator.store.tables import Node

    database = _database(arguments)
    with database.transaction() as session:
        nodes = session.scalars(select(Node).order_by(Node.created_at)).all()
        rows = [
            (
                node.id,
                node.name,
                "revoked"
                if node.revoked_at
                else "awaiting approval"
                if node.approved_at is None
                else "quarantined"
                if node.quarantined_at
                else "trusted"
                if node.trusted
                else "active",
                _ago(node.last_seen_at),
                str(node.jobs_completed),
                ledger.format_credits(ledger.balance(session, ledger.node_pending_account(node.id))),
            )
            for node in nodes
        ]
    if not rows:
        print("No nodes have registered yet.")
        return 0
    header = ("NODE", "NAME", "STATUS", "LAST SEEN", "JOBS", "PENDING CREDITS")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _revoke(arguments: argparse.Namespace) -> int:
    from compute_swarm.coordinator.domain.effects import NodeRevoked
    from compute_swarm.coordinator.service import accounts
    from compute_swarm.coordinator.store.database import after_commit

    database = _database(arguments)
    try:
        with database.transaction() as session:
            node = accounts.revoke_node(session, arguments.node_id)
            # On PostgreSQL its coordinator hears of it at once; on SQLite at its next sweep.
            after_commit(session, NodeRevoked(node.id))
    except accounts.AccountError as error:
        print(f"compute-swarm admin: {error}", file=sys.stderr)
        return 1
    print(f"Revoked node {node.id} ({node.name}); its jobs will be re-queued.")
    return 0


def _change_node(arguments: argparse.Namespace, change, done: str) -> int:
    from compute_swarm.coordinator.domain.effects import StandingChanged
    from compute_swarm.coordinator.store.database import after_commit
    from compute_swarm.coordinator.store.tables import Node

    settings = _settings(arguments)
    database = _database(arguments)
    with database.transaction() as session:
        node = session.get(Node, arguments.node_id)
        if node is None:
            print(f"compute-swarm admin: no node {arguments.node_id!r}", file=sys.stderr)
            return 1
        change(node, settings.verification_policy())
        after_commit(session, StandingChanged())
        print(done.format(node=node))
    return 0


def _trust(arguments: argparse.Namespace) -> int:
    def change(node, policy) -> None:
        node.trusted = not arguments.untrust

    what = "no longer trusted" if arguments.untrust else "trusted: it verifies others' jobs from now on"
    return _change_node(arguments, change, "Node {node.id} ({node.name}) is " + what + ".")


def _lift_quarantine(arguments: argparse.Namespace) -> int:
    from compute_swarm.coordinator.domain import verification
    from compute_swarm.coordinator.service.verifier import node_record, store_record

    def change(node, policy) -> None:
        store_record(node, verification.lifted(node_record(node, policy), policy))

    return _change_node(arguments, change, "Node {node.id} ({node.name}) may take jobs again.")


def _approve(arguments: argparse.Namespace) -> int:
    from compute_swarm.coordinator.service import admission

    return _change_node(
        arguments, admission.approve, "Node {node.id} ({node.name}) is approved: it takes work from now on."
    )


def _create_invite(arguments: argparse.Namespace) -> int:
    from compute_swarm.coordinator.service import admission

    database = _database(arguments)
    try:
        with database.transaction() as session:
            code = admission.create_invite(session, arguments.uses, arguments.hours, arguments.note)
    except ValueError as error:
        print(f"compute-swarm admin: {error}", file=sys.stderr)
        return 2
    uses = "once" if arguments.uses == 1 else f"{arguments.uses} times"
    print(
        f"An invite code, good {uses} for {arguments.hours:g} hours (it is not shown again):", file=sys.stderr
    )
    print(code)
    return 0


def _ago(moment: float | None) -> str:
    if moment is None:
        return "never"
    seconds = max(0, int(time.time() - moment))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _register_tunnel_server(subcommands: argparse._SubParsersAction) -> None:
    server = subcommands.add_parser(
        "tunnel-server",
        help="run frp's server (frps) for nodes behind NAT",
        description="Run frps for the nodes other nodes cannot reach: token-authenticated, TLS only. "
        "Give the coordinator the same address and token (SWARM_TUNNEL_SERVER=HOST:PORT, "
        "SWARM_TUNNEL_TOKEN).",
    )
    server.add_argument("--host", default="0.0.0.0", help="address frpc connects to (default 0.0.0.0)")
    server.add_argument("--port", type=int, default=7000, help="port frpc connects to (default 7000)")
    server.add_argument(
        "--proxy-host",
        default="0.0.0.0",
        help="address the nodes' ports are opened on, where their peers connect (default 0.0.0.0)",
    )
    server.add_argument(
        "--ports",
        default="20000-20999",
        metavar="FIRST-LAST",
        help="the ports handed to nodes, one each (default 20000-20999)",
    )
    server.add_argument(
        "--token-file",
        type=Path,
        help="a file holding the token (default: $SWARM_TUNNEL_TOKEN); at least 24 random characters",
    )
    server.add_argument("--data-dir", type=Path, default=None, help="where its configuration is written")
    server.set_defaults(handler=_tunnel_server)


def _tunnel_server(arguments: argparse.Namespace) -> int:
    """Write frps's configuration (service/tunnel_server.py) and become frps (exec), so a service
    manager supervises frps itself."""
    import os

    from compute_swarm.coordinator.service.tunnel_server import configuration
    from compute_swarm.coordinator.settings import default_data_dir
    from compute_swarm.frp import FrpNotFound, find_program

    if arguments.token_file is not None:
        try:
            token = arguments.token_file.read_text().strip()
        except OSError as error:
            print(f"--token-file: {error}", file=sys.stderr)
            return 2
    else:
        token = os.environ.get("SWARM_TUNNEL_TOKEN", "").strip()
    data_dir = arguments.data_dir or default_data_dir()
    try:
        text = configuration(arguments.host, arguments.port, arguments.proxy_host, arguments.ports, token)
        frps = find_program("frps", data_dir / "bin")
    except (ValueError, FrpNotFound) as error:
        print(error, file=sys.stderr)
        return 2
    path = data_dir / "frps.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)  # it holds the token
    path.write_text(text)
    print(f"frps on {arguments.host}:{arguments.port}, nodes' ports {arguments.ports} ({frps})", flush=True)
    os.execv(frps, [str(frps), "-c", str(path)])
    return 0  # not reached
