"""Money in currencies, as the coordinator and the seller's app both count it: integer micro-units
(a millionth of a dollar, a euro, a yen) and exact decimal text, never floats.

Credits are the swarm's own unit (protocol.format_credits). What a credit is worth in a currency is
ops' setting: the rate at which payouts are exported, and at which the seller's app compares earnings
with the electricity they cost.
"""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, Decimal

from compute_swarm.protocol import CreditValue, format_credits

MICRO = 1_000_000
# Joules in a kilowatt-hour, in millijoules: energy counters count millijoules (NVML) or microjoules.
MILLIJOULES_PER_KILOWATT_HOUR = 3_600_000_000
CURRENCY_PATTERN = r"^[A-Z]{3}$"

# ISO 4217 currencies whose smallest unit is not a hundredth: a payout is rounded to what can be paid.
_MINOR_UNITS = {
    **dict.fromkeys(("JPY", "KRW", "VND", "CLP", "ISK", "UGX", "XAF", "XOF", "PYG", "RWF", "KMF"), 0),
    **dict.fromkeys(("BHD", "KWD", "OMR", "JOD", "TND", "IQD", "LYD"), 3),
}
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "INR": "₹", "KRW": "₩", "BRL": "R$"}
_AMOUNT = re.compile(r"^\d{1,12}(\.\d{1,6})?$")


class MoneyError(ValueError):
    """An amount, a rate or a currency that cannot be used, with what was wrong in words."""


def check_currency(code: str) -> str:
    if not isinstance(code, str) or not re.match(CURRENCY_PATTERN, code):
        raise MoneyError(f"{code!r} is not a currency code: give three capital letters, like USD or EUR")
    return code


def minor_units(currency: str) -> int:
    """The decimals of the currency's smallest coin: 2 for most, 0 for the yen, 3 for the dinar."""
    return _MINOR_UNITS.get(check_currency(currency), 2)


def parse_micro(text: str, what: str = "amount") -> int:
    """A decimal amount as a person types it ("0.25", "12") to micro-units, exactly; at most six
    decimals, never negative."""
    cleaned = str(text).strip()
    if not _AMOUNT.match(cleaned):
        raise MoneyError(f"the {what} {text!r} is not a number like 0.25 (at most six decimals)")
    whole, _, fraction = cleaned.partition(".")
    return int(whole) * MICRO + int(fraction.ljust(6, "0") or 0)


def credits_value_micro(credits_micro: int, currency_micro_per_credit: int) -> int:
    """What `credits_micro` micro-credits are worth in micro-units of the currency, rounded down."""
    return credits_micro * currency_micro_per_credit // MICRO


def credits_worth(credits_micro: int, value: CreditValue) -> str:
    """Credits with what they are worth at the swarm's value: "3000 credits ($1.50)"."""
    worth = format_money(credits_value_micro(credits_micro, value.micro_per_credit), value.currency)
    return f"{format_credits(credits_micro)} credits ({worth})"


def payable_minor(credits_micro: int, rate: Decimal, currency: str) -> int:
    """Credits converted at `rate` (currency per credit) to the currency's smallest unit (cents),
    rounded down: a batch never pays out more than its credits are worth."""
    amount = Decimal(credits_micro) / MICRO * rate
    return int(amount.scaleb(minor_units(currency)).to_integral_value(rounding=ROUND_DOWN))


def minor_text(minor: int, currency: str) -> str:
    """An amount in the currency's smallest unit as decimal text: 1234 USD → "12.34", 5 JPY → "5"."""
    places = minor_units(currency)
    if places == 0:
        return str(minor)
    whole, fraction = divmod(abs(minor), 10**places)
    return f"{'-' if minor < 0 else ''}{whole}.{fraction:0{places}d}"


def energy_cost_micro(energy_millijoules: int, price_micro_per_kilowatt_hour: int) -> int:
    """What this much energy costs at the price per kWh, in micro-units, rounded half up."""
    numerator = energy_millijoules * price_micro_per_kilowatt_hour
    return (numerator + MILLIJOULES_PER_KILOWATT_HOUR // 2) // MILLIJOULES_PER_KILOWATT_HOUR


def format_money(micro: int, currency: str, places: int | None = None) -> str:
    """Micro-units for people: "$0.42", "€-1.20", "0.42 CHF". Rounded half away from zero to `places`
    decimals (default the currency's own; small sums may ask for more)."""
    places = minor_units(currency) if places is None else places
    step = 10 ** (6 - places)
    rounded = (abs(micro) + step // 2) // step
    whole, fraction = divmod(rounded, 10**places)
    number = f"{whole:,}" + (f".{fraction:0{places}d}" if places else "")
    sign = "-" if micro < 0 and rounded else ""
    symbol = _SYMBOLS.get(currency)
    return f"{sign}{symbol}{number}" if symbol else f"{sign}{number} {currency}"
