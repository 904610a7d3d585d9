"""`compute-swarm node --payouts` and `--payout PAYEE`: a seller's payouts from the command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from compute_swarm.money import credits_value_micro, format_money
from compute_swarm.protocol import format_credits

STATE_WORDS = {
    "requested": "requested, waiting for the swarm operator",
    "exported": "being paid by the swarm operator",
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
                    f"{payout['payee']}, {STATE_WORDS[payout['state']]}."
                )
            listing = client.payouts()
    except SwarmError as error:
        print(f"compute-swarm node: {error}", file=sys.stderr)
        return 1
    print(describe_payouts(listing))
    return 0


def describe_payouts(listing: dict) -> str:
    """What may be paid out and each payout's state, as lines for a terminal."""
    earnings, currency, value = listing["earnings"], listing["currency"], listing["value_micro_per_credit"]

    def worth(micro: int) -> str:
        return f"{format_credits(micro)} credits (about {format_money(credits_value_micro(micro, value), currency)})"

    lines = [
        f"available to pay out: {worth(earnings['available_micro'])}",
        f"waiting to be paid:   {worth(earnings['payout_pending_micro'])}",
        f"paid out so far:      {worth(earnings['paid_out_micro'])}",
        f"the least a payout may be: {format_credits(listing['minimum_micro'])} credits",
    ]
    for payout in listing["payouts"]:
        when = time.strftime("%Y-%m-%d", time.localtime(payout["requested_at"]))
        state = STATE_WORDS[payout["state"]]
        detail = (payout["reference"] and f"reference {payout['reference']}") or payout["reason"] or ""
        amount = f" = {payout['amount']} {payout['currency']}" if payout["amount"] else ""
        lines.append(
            f"  {when}  {payout['id']}  {format_credits(payout['amount_micro'])} credits{amount}  {state}"
            + (f": {detail}" if detail else "")
        )
    return "\n".join(lines)
