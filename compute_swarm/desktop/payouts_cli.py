"""`compute-swarm node --payouts` and `--payout PAYEE`: a seller's payouts from the command line, and
the words for payouts that the tray shows too."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from compute_swarm.money import credits_worth
from compute_swarm.protocol import CreditValue, format_credits

PAYOUT_STATES = {
    "requested": "requested: waiting for the swarm operator",
    "exported": "being paid",
    "paid": "paid",
    "rejected": "rejected",
}


def payouts_command(coordinator: str, data_dir: Path, payee: str | None, amount_micro: int | None) -> int:
    from compute_swarm.desktop import token_store
    from compute_swarm.sdk.client import NodeClient, SwarmError

    credentials = token_store.load(coordinator, data_dir)
    if credentials is None:
        print(
            f"compute-swarm node: this machine has not registered with {coordinator} yet: "
            f"run `compute-swarm node --coordinator {coordinator}` first",
            file=sys.stderr,
        )
        return 1
    try:
        with NodeClient(coordinator, credentials.token) as client:
            if payee is not None:
                payout = client.request_payout(payee, amount_micro=amount_micro)
                print(
                    f"Payout {payout['id']}: {format_credits(payout['amount_micro'])} credits to "
                    f"{payout['payee']}, {PAYOUT_STATES[payout['state']]}."
                )
            listing = client.payouts()
    except SwarmError as error:
        print(f"compute-swarm node: {error}", file=sys.stderr)
        return 1
    balances, lines = payout_lines(listing)
    print("\n".join([balances, *lines]))
    return 0


def payout_lines(listing: dict) -> tuple[str, list[str]]:
    """The balances line, and one line per payout (newest first) with its state and its reference or
    the reason it was rejected: what the tray shows and this command prints."""
    earnings = listing["earnings"]
    value = CreditValue(currency=listing["currency"], micro_per_credit=listing["value_micro_per_credit"])
    balances = (
        f"Available {credits_worth(earnings['available_micro'], value)} · being paid "
        f"{credits_worth(earnings['payout_pending_micro'], value)} · paid so far "
        f"{credits_worth(earnings['paid_out_micro'], value)}. "
        f"A payout is at least {format_credits(listing['minimum_micro'])} credits."
    )
    lines = []
    for payout in listing["payouts"]:
        when = datetime.datetime.fromtimestamp(payout["requested_at"]).strftime("%d %b")
        amount = f" = {payout['amount']} {payout['currency']}" if payout.get("amount") else ""
        detail = ""
        if payout.get("reference"):
            detail = f" (reference {payout['reference']})"
        elif payout.get("reason"):
            detail = f": {payout['reason']}"
        lines.append(
            f"{when} · {format_credits(payout['amount_micro'])} credits{amount} to {payout['payee']} · "
            f"{PAYOUT_STATES.get(payout['state'], payout['state'])}{detail}"
        )
    return balances, lines
