"""`compute-swarm admin payouts | export-payouts | mark-paid | reject-payout`: ops' payout queue from
the command line, on the coordinator's database (the same service the ops page calls)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register_payout_commands(
    actions: argparse._SubParsersAction, data_dir_option, settings, database
) -> None:
    """Add the payout commands to `compute-swarm admin`; `settings(arguments)` and `database(arguments)`
    open the coordinator's, as the other admin commands do."""

    def payouts_of(arguments: argparse.Namespace):
        from compute_swarm.coordinator.service.payouts import payouts_service

        return payouts_service(settings(arguments), database(arguments))

    listing = actions.add_parser("payouts", help="list payouts waiting for ops (or --state ...)")
    data_dir_option(listing)
    listing.add_argument(
        "--state",
        action="append",
        choices=("requested", "exported", "paid", "rejected"),
        help="only these states (repeatable; default requested and exported)",
    )
    listing.set_defaults(handler=lambda arguments: _list(payouts_of(arguments), arguments))

    export = actions.add_parser(
        "export-payouts",
        help="put every requested payout in a batch and write its CSV, converted at a rate",
    )
    data_dir_option(export)
    export.add_argument("--currency", help="e.g. EUR (default: SWARM_CREDIT_CURRENCY)")
    export.add_argument("--rate", help="currency per credit, e.g. 0.00046 (default: SWARM_CREDIT_VALUE)")
    export.add_argument("--output", type=Path, help="where to write the CSV (default: standard output)")
    export.set_defaults(handler=lambda arguments: _export(payouts_of(arguments), arguments))

    paid = actions.add_parser("mark-paid", help="mark an exported payout paid, with the payment's reference")
    data_dir_option(paid)
    paid.add_argument("payout_id")
    paid.add_argument("--reference", required=True, help="the transfer's own id, to trace it later")
    paid.set_defaults(
        handler=lambda arguments: _decide(
            payouts_of(arguments).mark_paid, arguments.payout_id, arguments.reference
        )
    )

    reject = actions.add_parser(
        "reject-payout", help="reject a payout: its credit goes back to the seller, who reads the reason"
    )
    data_dir_option(reject)
    reject.add_argument("payout_id")
    reject.add_argument("--reason", required=True)
    reject.set_defaults(
        handler=lambda arguments: _decide(payouts_of(arguments).reject, arguments.payout_id, arguments.reason)
    )


def _list(payouts, arguments: argparse.Namespace) -> int:
    from compute_swarm.protocol import format_credits

    states = tuple(arguments.state) if arguments.state else ("requested", "exported")
    queue = payouts.queue(states)
    rows = [
        (
            payout["id"],
            payout["node_name"],
            payout["state"],
            format_credits(payout["amount_micro"]),
            f"{payout['amount']} {payout['currency']}" if payout["amount"] else "",
            payout["payee"],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(payout["requested_at"])),
            payout["reference"] or payout["reason"] or "",
        )
        for payout in queue["payouts"]
    ]
    if not rows:
        print(f"No payouts {' or '.join(states)}.")
        return 0
    header = ("PAYOUT", "NODE", "STATE", "CREDITS", "AMOUNT", "PAYEE", "REQUESTED", "REFERENCE / REASON")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    owed = queue["totals_micro"]["requested"] + queue["totals_micro"]["exported"]
    print(f"\nOwed to sellers: {format_credits(owed)} credits.")
    return 0


def _export(payouts, arguments: argparse.Namespace) -> int:
    from compute_swarm.coordinator.service.payouts import PayoutError, Rate

    try:
        rate = None
        if arguments.currency or arguments.rate:
            default = payouts.default_rate
            rate = Rate.parse(arguments.currency or default.currency, arguments.rate or str(default.value))
        batch_id = payouts.export(rate)
        text = payouts.batch_csv(batch_id)
    except PayoutError as error:
        print(f"compute-swarm admin: {error}", file=sys.stderr)
        return 1
    if arguments.output is None:
        sys.stdout.write(text)
    else:
        arguments.output.write_text(text, encoding="utf-8")
    count = text.count("\n") - 1
    print(f"Exported batch {batch_id}: {count} payout(s). Pay them, then mark each paid.", file=sys.stderr)
    return 0


def _decide(decision, payout_id: str, words: str) -> int:
    from compute_swarm.coordinator.service.payouts import PayoutError
    from compute_swarm.protocol import format_credits

    try:
        payout = decision(payout_id, words)
    except PayoutError as error:
        print(f"compute-swarm admin: {error}", file=sys.stderr)
        return 1
    print(f"Payout {payout['id']} of {format_credits(payout['amount_micro'])} credits is {payout['state']}.")
    return 0
