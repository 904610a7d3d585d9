"""What the seller's electricity costs and what their work earns in their own money: the price per kWh
and its currency (a default from the locale, which the seller edits), the rate between the swarm's
currency and theirs when they differ, and the arithmetic of net profit in integer micro-units.
"""

from __future__ import annotations

import contextlib
import locale
import os
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, field_validator

from compute_swarm import money
from compute_swarm.money import MICRO
from compute_swarm.protocol import CreditValue

# Typical household prices per kWh (2024–25, taxes included), by the locale's country, in its currency:
# a starting point the seller replaces with the price on their bill.
TYPICAL_PRICES = {
    "US": ("USD", "0.17"), "CA": ("CAD", "0.19"), "MX": ("MXN", "1.60"), "BR": ("BRL", "0.85"),
    "GB": ("GBP", "0.25"), "IE": ("EUR", "0.37"), "DE": ("EUR", "0.40"), "FR": ("EUR", "0.25"),
    "ES": ("EUR", "0.24"), "PT": ("EUR", "0.23"), "IT": ("EUR", "0.33"), "NL": ("EUR", "0.35"),
    "BE": ("EUR", "0.36"), "AT": ("EUR", "0.30"), "FI": ("EUR", "0.20"), "CH": ("CHF", "0.30"),
    "SE": ("SEK", "2.00"), "NO": ("NOK", "1.50"), "DK": ("DKK", "2.60"), "PL": ("PLN", "1.05"),
    "CZ": ("CZK", "6.50"), "TR": ("TRY", "3.00"), "RU": ("RUB", "6.50"), "IN": ("INR", "8.00"),
    "CN": ("CNY", "0.55"), "JP": ("JPY", "31"), "KR": ("KRW", "150"), "AU": ("AUD", "0.33"),
    "NZ": ("NZD", "0.35"), "ZA": ("ZAR", "3.50"),
}  # fmt: skip
FALLBACK_COUNTRY = "US"


class ElectricitySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    price_per_kwh: str = "0.17"  # exact decimal text, in `currency`
    currency: str = "USD"
    # When the swarm pays in another currency than the seller's: what one unit of the swarm's currency
    # is in the seller's (e.g. 0.92 EUR for 1 USD). None: not given, and net profit cannot be shown.
    exchange_rate: str | None = None
    # Decline jobs whose pay would not cover the electricity they are expected to use.
    only_profitable: bool = False

    @field_validator("price_per_kwh")
    @classmethod
    def _price(cls, value: str) -> str:
        money.parse_micro(value, "price per kWh")
        return value.strip()

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return money.check_currency(value.strip().upper())

    @field_validator("exchange_rate")
    @classmethod
    def _exchange_rate(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if money.parse_micro(value, "exchange rate") == 0:
            raise ValueError("the exchange rate must be more than 0")
        return value.strip()

    @property
    def price_micro_per_kwh(self) -> int:
        return money.parse_micro(self.price_per_kwh)


def locale_country(environment: dict[str, str] | None = None) -> str | None:
    """The country of the seller's locale ("de_DE.UTF-8" → "DE"), from LC_ALL, LC_MONETARY or LANG, else
    the system's locale (Windows and macOS set no variables)."""
    environment = os.environ if environment is None else environment
    names = [environment.get(name, "") for name in ("LC_ALL", "LC_MONETARY", "LANG")]
    if environment is os.environ:
        with contextlib.suppress(ValueError):
            names.append(locale.getlocale()[0] or "")
    for name in names:
        _language, separator, rest = name.partition("_")
        country = rest[:2].upper()
        if separator and len(country) == 2 and country.isalpha():
            return country
    return None


def default_electricity(environment: dict[str, str] | None = None) -> ElectricitySettings:
    """A typical household price in the locale's currency, to be replaced with the seller's own."""
    country = locale_country(environment)
    currency, price = TYPICAL_PRICES.get(country or "", TYPICAL_PRICES[FALLBACK_COUNTRY])
    return ElectricitySettings(price_per_kwh=price, currency=currency)


def electricity_cost_micro(energy_millijoules: int, settings: ElectricitySettings) -> int:
    """What this much energy cost at the seller's price, in micro-units of their currency."""
    return money.energy_cost_micro(energy_millijoules, settings.price_micro_per_kwh)


@dataclass(frozen=True)
class Conversion:
    """Credits into the seller's currency: the swarm's value of a credit, then the seller's exchange
    rate where the currencies differ."""

    credit_value: CreditValue
    settings: ElectricitySettings

    @property
    def possible(self) -> bool:
        return self.credit_value.currency == self.settings.currency or self.settings.exchange_rate is not None

    def local_micro(self, credits_micro: int) -> int | None:
        """What these credits are worth in the seller's currency (micro-units, rounded down); None when
        the currencies differ and the seller gave no exchange rate."""
        value = money.credits_value_micro(credits_micro, self.credit_value.micro_per_credit)
        if self.credit_value.currency == self.settings.currency:
            return value
        if self.settings.exchange_rate is None:
            return None
        return value * money.parse_micro(self.settings.exchange_rate) // MICRO

    def missing(self) -> str:
        """What the seller must set for net profit to be shown, in words."""
        return (
            f"the swarm pays in {self.credit_value.currency} and your electricity is in {self.settings.currency}: "
            f"set how much 1 {self.credit_value.currency} is in {self.settings.currency} in Settings"
        )


def expected_cost_micro(watts: float, seconds: float, settings: ElectricitySettings) -> int:
    """The electricity `watts` for `seconds` cost, in micro-units of the seller's currency."""
    millijoules = int(watts * seconds * 1000)
    return money.energy_cost_micro(millijoules, settings.price_micro_per_kwh)


def cost_per_hour_micro(watts: float, settings: ElectricitySettings) -> int:
    return money.energy_cost_micro(int(watts * 3600 * 1000), settings.price_micro_per_kwh)
