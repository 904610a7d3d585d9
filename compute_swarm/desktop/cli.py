"""`compute-swarm node`: run this machine as a headless seller node until Ctrl-C, or show its earnings;
`compute-swarm tray`: the same node with the tray app. Both keep to the guards in the seller's settings."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

# Only the standard library at import: every `compute-swarm` command loads this module.
from compute_swarm.desktop.token_store import COORDINATOR_ENVIRONMENT_VARIABLE

INVITE_CODE_ENVIRONMENT_VARIABLE = "SWARM_INVITE_CODE"


def default_data_directory() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("compute-swarm", appauthor=False)) / "node"


def register_commands(subcommands: argparse._SubParsersAction) -> None:
    node = subcommands.add_parser(
        "node",
        help="sell this machine's GPU: run jobs leased by a coordinator",
        description="Connect to a coordinator and run the fine-tuning jobs it leases to this machine, "
        "until Ctrl-C (a running job saves a checkpoint first, so another node can resume it). "
        "The first run registers the machine and keeps its token in the OS keyring "
        "(or a file readable only by you).",
    )
    node.add_argument(
        "--coordinator",
        default=os.environ.get(COORDINATOR_ENVIRONMENT_VARIABLE),
        help=f"the coordinator's http(s) URL (default: ${COORDINATOR_ENVIRONMENT_VARIABLE})",
    )
    node.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where jobs, cached datasets and logs go (default: the platform's user data directory)",
    )
    node.add_argument("--name", help="how this node is listed (default: the host name)")
    node.add_argument(
        "--invite-code",
        default=os.environ.get(INVITE_CODE_ENVIRONMENT_VARIABLE) or None,  # set but empty: none
        help="the code from the coordinator's operators, where they admit nodes by invitation "
        f"(only the first run needs it; default: ${INVITE_CODE_ENVIRONMENT_VARIABLE})",
    )
    node.add_argument("--device", help="cpu, cuda:N or mps (default: the best one found, per job)")
    guards = node.add_argument_group(
        "guards",
        "when to pause work (the defaults come from the settings file the tray app writes: "
        "compute-swarm tray → Settings)",
    )
    guards.add_argument(
        "--max-temperature",
        type=float,
        metavar="CELSIUS",
        help="pause while a GPU is this hot or hotter, until it is 8 °C cooler (default 83)",
    )
    guards.add_argument(
        "--ignore-games",
        action="store_true",
        help="keep working while another program holds GPU memory or runs full screen",
    )
    guards.add_argument(
        "--only-when-idle",
        type=int,
        metavar="MINUTES",
        help="work only after this long without keyboard or mouse input (where the OS says)",
    )
    guards.add_argument(
        "--hours",
        metavar="START-END",
        help="work only between these hours of the day, local time, e.g. 22-8",
    )
    sharing = node.add_argument_group(
        "sharing",
        "swarm transfer: fetching models and data from other nodes, and serving them what this one holds",
    )
    sharing.add_argument(
        "--no-sharing",
        action="store_true",
        help="fetch everything from the coordinator and serve nothing to other nodes",
    )
    sharing.add_argument(
        "--upload-limit",
        type=int,
        metavar="KIB_PER_SECOND",
        help="send other nodes at most this many KiB/s (default: the settings file's, else no cap)",
    )
    sharing.add_argument(
        "--cache-gib", type=float, metavar="GIB", help="keep at most this much data cached (default 5)"
    )
    sharing.add_argument(
        "--transfer-port",
        type=int,
        metavar="PORT",
        help="the TCP port other nodes reach this one on (default: any free port)",
    )
    economics = node.add_argument_group(
        "electricity", "what this computer's electricity costs, for net profit (default: the settings file's)"
    )
    economics.add_argument(
        "--electricity-price", metavar="PRICE", help="per kWh, in --currency, as on your bill (e.g. 0.32)"
    )
    economics.add_argument("--currency", metavar="CODE", help="your electricity's currency (e.g. EUR)")
    economics.add_argument(
        "--only-profitable",
        action="store_true",
        help="decline jobs expected to cost more electricity than they pay",
    )
    action = node.add_mutually_exclusive_group()
    action.add_argument(
        "--earnings", action="store_true", help="show credits earned and jobs completed, then exit"
    )
    action.add_argument(
        "--payouts", action="store_true", help="list this node's payouts and what may be paid out, then exit"
    )
    action.add_argument(
        "--payout",
        metavar="PAYEE",
        help="ask to be paid the available credit at PAYEE (an e-mail, account or wallet the swarm's "
        "operator pays to), then exit",
    )
    node.add_argument(
        "--payout-credits",
        type=_credits,
        metavar="CREDITS",
        help="with --payout: this much, not all that is available",
    )
    action.add_argument(
        "--forget",
        action="store_true",
        help="forget this machine's node token for the coordinator (the next run registers again)",
    )
    node.set_defaults(handler=run_node_command)


def register_runtime_command(subcommands: argparse._SubParsersAction) -> None:
    runtime = subcommands.add_parser(
        "runtime",
        help="fetch, check or repair the engine runtime a packaged app runs jobs with",
        description="Fetch the engine runtime (torch for this machine's GPU, transformers, peft...) "
        "from the locks this app carries, every file checked against its sha256, into a versioned "
        "folder; or check the one in use and fetch again what is damaged. An interrupted fetch "
        "resumes where it stopped.",
    )
    runtime.add_argument(
        "--source",
        action="append",
        metavar="INDEX_OR_FOLDER",
        help="a package index URL (PyPI's simple API or a mirror) or a folder of wheels, tried in "
        "order; repeat for more (default: the settings' runtime sources, else the torch build's "
        "PyTorch index, then PyPI)",
    )
    runtime.add_argument(
        "--root", type=Path, default=None, help="where runtimes go (default: the platform's data folder)"
    )
    runtime.add_argument(
        "--status", action="store_true", help="say which runtime is in use and which this machine needs"
    )
    runtime.set_defaults(handler=run_runtime_command)


def run_runtime_command(arguments: argparse.Namespace) -> int:
    from tqdm import tqdm

    from compute_swarm.desktop.runtime import this_machine
    from compute_swarm.desktop.runtime.fetch import Busy, Progress
    from compute_swarm.desktop.runtime.pins import LockError
    from compute_swarm.desktop.runtime.wheels import WheelError
    from compute_swarm.desktop.settings import SettingsError, SettingsStore
    from compute_swarm.engine.package_index import SourceError

    try:
        settings = SettingsStore().load().settings
        runtime, choice = this_machine.engine_runtime(
            arguments.source or settings.runtime_sources,
            coordinator=settings.coordinator,
            root=arguments.root,
        )
    except (LockError, SettingsError) as error:
        _say(str(error), "runtime")
        return 1
    _say(f"torch build {choice.build}: {choice.reason}", "runtime")
    if arguments.status:
        state = "ready" if runtime.ready() else "not fetched yet"
        _say(
            f"in use: {runtime.in_use() or 'none'}; this machine's runtime {runtime.folder}: {state}",
            "runtime",
        )
        return 0
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)

    def show(progress: Progress) -> None:
        if progress.stage in ("downloading", "installing"):
            bar.total = progress.total_bytes
            bar.n = progress.done_bytes
        bar.set_description_str(progress.detail[:60], refresh=True)

    try:
        folder = runtime.fetch(show)
    except (SourceError, WheelError, Busy) as error:
        bar.close()
        _say(f"the runtime could not be fetched: {error}", "runtime")
        return 1
    except KeyboardInterrupt:
        bar.close()
        _say("stopped: run it again to go on where it stopped", "runtime")
        return 130
    bar.close()
    _say(f"the engine runtime is ready in {folder}", "runtime")
    return 0


def register_tray_command(subcommands: argparse._SubParsersAction) -> None:
    tray = subcommands.add_parser(
        "tray",
        help="the seller's tray app: one click to earn, GPU temperature and earnings at a glance",
        description="Start the compute-swarm tray app (a second launch shows the running one's window).",
    )
    tray.add_argument("--minimized", action="store_true", help="start in the tray, without the window")
    tray.add_argument("--data-dir", type=Path, default=None, help="as for `compute-swarm node`")
    tray.set_defaults(handler=run_tray_command)


def run_tray_command(arguments: argparse.Namespace) -> int:
    try:
        from compute_swarm.desktop.tray.app import run_tray
    except ImportError as error:
        _say(f"the tray app needs PySide6: pip install 'compute-swarm[desktop]' ({error})")
        return 1
    return run_tray(arguments.data_dir or default_data_directory(), minimized=arguments.minimized)


def node_settings(arguments: argparse.Namespace):
    """The settings file's guards, sharing and electricity, with the command line's changes; raises
    ValueError for a bad value."""
    from pydantic import ValidationError

    from compute_swarm.desktop.settings import SettingsError, SettingsStore

    try:
        loaded = SettingsStore().load()
    except SettingsError as error:
        raise ValueError(str(error)) from None
    if loaded.problem:
        _say(loaded.problem)
    guards: dict[str, object] = {}
    if arguments.max_temperature is not None:
        guards["temperature_limit_celsius"] = arguments.max_temperature
    if arguments.ignore_games:
        guards.update(pause_for_games=False, pause_when_full_screen=False)
    if arguments.only_when_idle is not None:
        guards.update(only_when_idle=True, idle_minutes=arguments.only_when_idle)
    if arguments.hours is not None:
        start, separator, end = arguments.hours.partition("-")
        if not (separator and start.strip().isdigit() and end.strip().isdigit()):
            raise ValueError(f"--hours {arguments.hours!r}: give START-END in whole hours, e.g. 22-8")
        guards.update(schedule_enabled=True, schedule_start_hour=int(start), schedule_end_hour=int(end))
    sharing: dict[str, object] = {}
    if arguments.no_sharing:
        sharing["enabled"] = False
    for option, field in (
        ("upload_limit", "upload_limit_kib_per_second"),
        ("cache_gib", "cache_gib"),
        ("transfer_port", "port"),
    ):
        if getattr(arguments, option) is not None:
            sharing[field] = getattr(arguments, option)
    electricity: dict[str, object] = {}
    for option, field in (("electricity_price", "price_per_kwh"), ("currency", "currency")):
        if getattr(arguments, option) is not None:
            electricity[field] = getattr(arguments, option)
    if arguments.only_profitable:
        electricity["only_profitable"] = True
    settings = loaded.settings
    try:
        return (
            settings.guards.model_validate({**settings.guards.model_dump(), **guards}),
            settings.sharing.model_validate({**settings.sharing.model_dump(), **sharing}),
            settings.electricity.model_validate({**settings.electricity.model_dump(), **electricity}),
        )
    except ValidationError as error:
        first = error.errors()[0]
        raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def run_node_command(arguments: argparse.Namespace) -> int:
    from compute_swarm.desktop import token_store

    if not arguments.coordinator:
        _say(f"give --coordinator URL (or set {COORDINATOR_ENVIRONMENT_VARIABLE})")
        return 2
    try:
        coordinator = token_store.normalize_coordinator_url(arguments.coordinator)
    except ValueError as error:
        _say(str(error))
        return 2
    data_dir = arguments.data_dir or default_data_directory()
    if arguments.forget:
        if token_store.forget(coordinator, data_dir):
            _say(f"forgot this node's token for {coordinator}; the next run registers the machine again")
        else:
            _say(f"no token for {coordinator} was stored here")
        return 0
    if arguments.earnings:
        return _show_earnings(coordinator, data_dir)
    if arguments.payouts or arguments.payout:
        from compute_swarm.desktop.payouts_cli import payouts_command

        return payouts_command(coordinator, data_dir, arguments.payout, arguments.payout_credits)
    return _serve(coordinator, data_dir, arguments)


def _credits(text: str) -> int:
    """Credits as typed ("2.5") to micro-credits, exactly."""
    from compute_swarm.money import MoneyError, parse_micro

    try:
        return parse_micro(text, "credits")
    except MoneyError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _show_earnings(coordinator: str, data_dir: Path) -> int:
    from compute_swarm.desktop import token_store
    from compute_swarm.protocol import format_credits
    from compute_swarm.sdk.client import NodeClient, SwarmError

    credentials = token_store.load(coordinator, data_dir)
    if credentials is None:
        _say(
            f"this machine has not registered with {coordinator} yet: "
            f"run `compute-swarm node --coordinator {coordinator}` first"
        )
        return 1
    try:
        with NodeClient(coordinator, credentials.token) as client:
            earnings = client.me()["earnings"]
    except SwarmError as error:
        _say(str(error))
        return 1
    print(f"node {credentials.node_id} at {coordinator}")
    print(f"pending:   {format_credits(earnings['pending_micro'])} credits (held until verified)")
    print(f"available: {format_credits(earnings['available_micro'])} credits")
    print(f"jobs completed: {earnings['jobs_completed']}")
    return 0


def _serve(coordinator: str, data_dir: Path, arguments: argparse.Namespace) -> int:
    from compute_swarm.desktop.agent import NodeAgent
    from compute_swarm.desktop.node_stopped import InviteCodeRefused, NodeStopped
    from compute_swarm.desktop.settings import normalize_invite_code

    try:
        guards, sharing, electricity = node_settings(arguments)
    except ValueError as error:
        _say(str(error))
        return 2
    invite_code = arguments.invite_code
    if invite_code is not None:
        try:
            invite_code = normalize_invite_code(invite_code)
        except ValueError as error:
            _say(f"--invite-code: {error}")
            return 2
    printer = _StatusPrinter(coordinator)
    agent = NodeAgent(
        coordinator,
        data_dir,
        name=arguments.name,
        device=arguments.device,
        on_change=printer,
        guards=guards,
        invite_code=invite_code,
        transfer=sharing,
        electricity=electricity,
    )
    try:
        asyncio.run(_run_until_interrupted(agent))
    except InviteCodeRefused as refusal:
        _say(invite_code_advice(refusal))
        return 1
    except NodeStopped as error:
        _say(str(error))
        return 1
    except KeyboardInterrupt:  # a third Ctrl-C, or one before the agent's loop started
        return 130
    return 0


def invite_code_advice(refusal) -> str:
    """What a seller at the terminal does about a registration refused for its invite code."""
    if refusal.code_given:
        return (
            f"the coordinator at {refusal.coordinator} refused the invite code ({refusal.detail}): "
            "run again with --invite-code and a new code from its operators"
        )
    return (
        f"the coordinator at {refusal.coordinator} admits computers by invitation ({refusal.detail}): "
        f"run again with --invite-code CODE (or set {INVITE_CODE_ENVIRONMENT_VARIABLE}), with the code "
        "its operators gave you"
    )


async def _run_until_interrupted(agent) -> None:
    """Ctrl-C (or SIGTERM) stops the agent gracefully; a second one stops it at once."""
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_signal(number: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            job = agent.status.job
            if job is not None:
                _say(f"stopping: job {job.job_id} saves a checkpoint first (Ctrl-C again to quit at once)")
            else:
                _say("stopping")
        elif interrupts > 2:
            raise KeyboardInterrupt
        loop.call_soon_threadsafe(agent.stop)

    # signal.signal rather than loop.add_signal_handler: it works on Windows too.
    handled = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {number: signal.signal(number, on_signal) for number in handled}
    try:
        await agent.run()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class _StatusPrinter:
    """Says on stderr what a seller watching the terminal wants to know: connected, held by the swarm
    operator or not, jobs, earnings."""

    def __init__(self, coordinator: str):
        self.coordinator = coordinator
        self._connected_before = False
        self._was_connected = False
        self._job: str | None = None
        self._last_job = None
        self._pause_reason: str | None = None
        self._standing = None

    def __call__(self, status) -> None:
        if status.connected and not self._was_connected:
            again = "re" if self._connected_before else ""
            if status.job is not None:
                doing = f"job {status.job.job_id} goes on"
            elif status.standing is not None and status.standing.state != "active":
                doing = _held(status.standing)
            else:
                doing = "waiting for jobs"
            _say(f"{again}connected to {self.coordinator} as node {status.node_id}; {doing}")
            self._connected_before = True
            self._standing = status.standing
        self._was_connected = status.connected
        if status.job is not None and status.job.job_id != self._job:
            _say(
                f"running job {status.job.job_id} (attempt {status.job.attempt} of {status.job.max_attempts})"
            )
        self._job = status.job.job_id if status.job is not None else None
        if status.pause_reason != self._pause_reason:
            _say(f"paused: {status.pause_reason}" if status.paused else "working again")
            self._pause_reason = status.pause_reason
        if status.standing is not None and status.standing != self._standing:
            if status.standing.state != "active":
                _say(_held(status.standing))
            elif self._standing is not None:
                _say("the swarm operator lets this computer take work now: waiting for jobs")
            self._standing = status.standing
        if status.last_job is not None and status.last_job != self._last_job:
            outcome = status.last_job
            _say(f"job {outcome.job_id} {outcome.outcome}: {outcome.message}")
        self._last_job = status.last_job


def _held(standing) -> str:
    """Why the coordinator gives this node no work, for the seller at the terminal."""
    if standing.state == "awaiting_approval":
        return "waiting for the swarm operator to approve this computer (it takes jobs as soon as they do)"
    return f"paused by the swarm operator: {standing.reason or 'no work for now'}"


def _say(message: str, command: str = "node") -> None:
    print(f"compute-swarm {command}: {message}", file=sys.stderr, flush=True)
