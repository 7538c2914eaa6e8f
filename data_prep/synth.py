"""Synthetic payment world: users, merchants and three raw event sources with planted labels.

`plm-synth out=DIR users=N seed=S` writes a folder in the raw contract
(`shared/spec/raw-events.md`, columns in `plm.data.schema.RAW_SOURCES`)::

    DIR/payments/part-00000.parquet ...   (about `part_rows` rows per part file)
    DIR/logins/part-*.parquet
    DIR/orders/part-*.parquet
    DIR/labels.parquet                   user_id, segment, churn, ato, future_spend
    DIR/world.json                       cut-off, seed, counts, label descriptions (`meta`)

It is a research fixture: every label is a function of hidden state that only shows through
the *mix, order and timing* of a user's events, with decoys so that per-user counts alone do
not solve any task. Everything is drawn from one `np.random.default_rng(seed)`, whole
population at a time (no per-event or per-user Python loops), so the same seed gives
byte-identical files and a million events take a few seconds.

The world
---------
* **Time.** Observed history is `days` days from `start` (UTC midnight); the cut-off is
  `start + days`. Every written valid event is in `[start, cutoff)`. Timestamps are drawn in
  the local time of the country where the user is and converted to UTC (microseconds).
* **Countries.** Twelve countries (`COUNTRIES`), each with its currency, exchange rate, price
  level and UTC offset. Users have a home country (`home_countries`, mostly IN/INR); a
  payment's currency is always the currency of its country.
* **Merchants.** `merchants` merchants, each with one MCC and one country (every (country,
  MCC) pair has some, two or more with the automatic count; the rest follow demand). Within
  a pair, popularity is Zipf-skewed (weight ~ 1/rank^1.1). Users are loyal: at home, with a
  per-user probability they return to their own favourite merchant of the category.
* **Users.** Each user has a latent persona (`PERSONAS`, the `segment` label), an income
  multiplier (log-normal, persona-shifted but overlapping), a base activity rate (same
  distribution for every persona, so counts overlap), a slow trend in activity, loyalty, a
  preferred channel mix, 1-2 known devices (a phone, maybe a laptop), maybe a phone upgrade
  mid-history, an auth-method habit, maybe a late join date, and 0-4 trips abroad.
* **Payments.** Discretionary payments are a non-homogeneous Poisson process per user: a
  (users, days) day-weight matrix (persona weekly rhythm x payday surge x trend x trips x
  churn fade x quiet spells x join date) picks the day; the persona's weekday/weekend hour
  profile (shifted per user) picks the local hour. The category (MCC) is then drawn with
  logits = user mix + category hour profile (transit at commute hours, fast food late,
  restaurants at dinner, ...) + weekend / abroad / payday / churn-fade boosts, so order and
  time of day carry the persona. Channel ~ category base x user preference (more
  card-present abroad; p2p only for money transfers, mcc 4829); amounts are log-normal per
  category x income^elasticity x country price level, in local currency (cash withdrawals in
  round notes). Card-present
  payments have a null device; online ones use a known device. On top: monthly bills
  (telecom, digital subscriptions) on a fixed day of month at night, with a null device;
  trip bookings (airline, then hotel minutes later) days before each trip; declines (logistic
  in amount / income, low income, end of month, abroad), each retried within minutes half of
  the time; and reversals (refunds) days after some online purchases.
* **Logins** precede most online payments by seconds to minutes (same device, IP country =
  where the user is), plus standalone app logins on the user's rhythm. About 3-4% of logins
  fail and are retried. The first login on a new device follows 0-3 failed attempts and uses
  `otp` about half the time, else `password`; known phones mostly `biometric`/`password`,
  laptops `password`.
* **Orders** precede most online baskets (retail MCCs) by up to 20 minutes: same merchant,
  same amount, `n_items` >= 1, and an order category.

Labels (`labels.parquet`, one row per user; `meta["labels"]` repeats these descriptions)
--------------------------------------------------------------------------------------------
* `segment` (multi-class 0-4): the persona. It changes the category mix, the hour and weekday
  profiles, the channel mix, the payday surge, trips, bills and income, but every one of them
  is blurred per user (Dirichlet mix around the persona blended with the population mix,
  hour shifts, noise), and activity counts have the same distribution for every persona.
* `churn` (0/1, ~`churn_rate`): the user leaves during the `horizon_days` after the cut-off.
  60% of churners *fade*: over their last 2-8 weeks the activity decays to 5-35% of normal,
  the mix tilts towards cash withdrawals and money transfers (emptying the account), and half
  of them cancel their monthly bills (a bill that stops arriving). The other 40% leave
  abruptly with no warning (irreducible error). Decoys: 15% of users have a *quiet spell*
  (10-35 days at 5-30% activity) anywhere, including just before the cut-off, and every user
  has a random trend, so a recent dip alone is not churn.
* `ato` (0/1, ~`ato_rate`): account takeover. At a random moment an attacker logs in from a
  NEW device with a FOREIGN IP country (after 0-3 failed attempts, at any hour), and within
  minutes makes 1-5 risky payments on that device: high amounts (~10x a typical purchase),
  e-commerce (electronics, gift cards, gambling, transfers) or p2p money transfers, to
  merchants picked uniformly (so new to the user), a third of them declined and some retried.
  Decoys, each with the same ingredients in a different order or timing:
  - travellers who log in from a new device abroad at the start of a trip (same failure and
    auth-method mix) and then use it for small local payments, half of them within minutes;
    a third of them also make a burst of risky payments with it, but days later;
  - users who make exactly the same kind of risky burst from a known device (or from a new
    device at home), a login minutes before;
  - phone upgrades: a new device, then normal use; foreign logins on known devices on every
    trip; and, as in any real extract, devices whose first event in the window happens on a
    trip (left-censoring), sometimes with an online hotel booking minutes later.
  Planted stories are counted in `meta["stories"]`.
* `future_spend` (numeric): log1p of the USD-equivalent amount the user spends in the
  `horizon_days` after the cut-off (0 after churning). It follows the user's rate, trend,
  income and mix, so recent activity and its trend predict it.

Dirty rows
----------
`dirty_fraction` > 0 appends that fraction (per source) of extra invalid rows, cycling
through kinds to exercise the quarantine: exact duplicates, null event_id / user_id / ts, ts
out of range (1971 or decades in the future), amount NaN / inf / 0 / negative, mcc outside
0-9999, n_items 0, and conflicting event_ids (same id, different content). `meta["dirty"]`
counts them per source and kind; `meta["events"]` counts only the valid rows.

Scale: memory is dominated by a few (users, days) float64 matrices, ~50 bytes x users x days.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import MISSING

from plm.data.schema import RAW_SOURCES, canonical_schema

GENERATOR_VERSION = "1.0"

# ----------------------------------------------------------------------------- config


@dataclass
class SynthConfig:
    """`plm-synth out=DIR users=N seed=S`: write a synthetic payment world in the raw contract.

    Goes in: these fields (hydra overrides). Comes out: `out/{payments,logins,orders}/*.parquet`,
    `out/labels.parquet` and `out/world.json` (see the module docstring). Example:
    `plm-synth out=runs/demo/raw users=3000 seed=0` (~300k events, a couple of seconds).
    """

    out: str = MISSING  # output folder; must be absent or empty unless overwrite=true
    users: int = 1000  # accounts in the world (~100 events each with the default rates)
    seed: int = 0  # the world is a pure function of the config: same seed => identical bytes
    start: str = "2024-01-01"  # first day of observed history (ISO date, UTC)
    days: int = 180  # length of observed history; the cut-off is start + days (midnight UTC)
    horizon_days: int = 30  # label window after the cut-off (churn, future_spend)
    merchants: int = 0  # 0 = auto: max(2 per (country, mcc) pair, users // 4); else >= 1 per pair (240)
    payments_per_day: float = 0.25  # median user's rate of discretionary payments (log-normal spread)
    logins_per_day: float = 0.08  # median user's rate of standalone app logins
    # Home-country shares (ISO 3166 alpha-2 codes among COUNTRIES); normalised.
    # (hydra merges dict overrides; to replace: '~home_countries' '+home_countries={US:1}')
    home_countries: dict[str, float] = field(
        default_factory=lambda: {"IN": 0.8, "US": 0.08, "GB": 0.05, "DE": 0.04, "FR": 0.03}
    )
    churn_rate: float = 0.2  # share of users who leave during the horizon
    ato_rate: float = 0.05  # share of users whose account is taken over before the cut-off
    dirty_fraction: float = 0.0  # extra invalid rows per source, as a fraction of its valid rows
    part_rows: int = 500_000  # rows per Parquet part file
    overwrite: bool = False  # replace the outputs of an earlier run in `out`


# ----------------------------------------------------------------------------- world tables


@dataclass(frozen=True)
class _Country:
    code: str  # ISO 3166 alpha-2
    currency: str  # ISO 4217
    fx: float  # currency units per USD
    price: float  # price level: what a 1-USD US basket costs here, in USD
    utc_offset_h: float
    travel: float  # weight as a travel destination
    attacker: float  # weight as the IP country of an account takeover
    xborder: float  # weight as the country of a cross-border e-commerce merchant
    cash_unit: float  # cash withdrawals are multiples of this (local currency)
    decimals: int  # minor-unit digits of the currency


COUNTRIES: tuple[_Country, ...] = (
    _Country("IN", "INR", 83.0, 0.30, 5.5, 1.0, 0.6, 0.1, 500, 2),
    _Country("US", "USD", 1.0, 1.00, -5.0, 1.0, 1.0, 3.0, 20, 2),
    _Country("GB", "GBP", 0.79, 0.95, 0.0, 1.0, 0.6, 1.0, 10, 2),
    _Country("DE", "EUR", 0.92, 0.85, 1.0, 0.6, 0.4, 0.5, 10, 2),
    _Country("FR", "EUR", 0.92, 0.90, 1.0, 0.8, 0.4, 0.3, 10, 2),
    _Country("AE", "AED", 3.67, 0.80, 4.0, 1.2, 0.5, 0.2, 50, 2),
    _Country("SG", "SGD", 1.35, 0.90, 8.0, 1.2, 0.5, 0.8, 10, 2),
    _Country("TH", "THB", 36.0, 0.45, 7.0, 1.2, 0.5, 0.1, 100, 2),
    _Country("JP", "JPY", 150.0, 0.80, 9.0, 0.6, 0.3, 0.3, 1000, 0),
    _Country("BR", "BRL", 5.0, 0.50, -3.0, 0.2, 1.2, 0.1, 20, 2),
    _Country("NG", "NGN", 1500.0, 0.35, 1.0, 0.15, 1.4, 0.05, 1000, 2),
    _Country("VN", "VND", 24500.0, 0.35, 7.0, 0.5, 1.2, 0.05, 100_000, 0),
)

CHANNELS = ("card_present", "ecommerce", "wallet", "p2p")
CP, ECOM, WALLET, P2P = range(4)
STATUSES = ("success", "declined", "reversed")
OK, DECLINED, REVERSED = range(3)
AUTH_METHODS = ("password", "otp", "biometric")
PASSWORD, OTP, BIOMETRIC = range(3)


@dataclass(frozen=True)
class _Category:
    mcc: int
    name: str
    usd: float  # median amount at US prices for an income multiplier of 1
    sigma: float  # log-normal spread of amounts
    elasticity: float  # amount ~ income ** elasticity
    hours: tuple[tuple[float, float, float], ...]  # local-hour peaks: (center, width, weight)
    weekend: float  # rate multiplier on Saturday and Sunday
    abroad: float  # rate multiplier while travelling
    channels: tuple[float, float, float, float]  # base weights: card_present, ecommerce, wallet, p2p
    xborder: float  # chance an e-commerce payment at home goes to a foreign merchant
    order: str | None = None  # order category when bought online (None: no order event)
    items: float = 0.0  # mean extra items per order (n_items = 1 + Poisson(items))


CATEGORIES: tuple[_Category, ...] = (
    _Category(5411, "grocery", 35, 0.7, 0.4, ((11, 3, 1), (18, 2, 1.2)), 1.3, 0.5, (6, 1.2, 3, 0), 0.0, "groceries", 6.0),
    _Category(5499, "convenience", 8, 0.6, 0.3, ((8, 2, 0.6), (17, 3, 1), (22, 2, 0.5)), 1.0, 1.2, (6, 0, 4, 0), 0.0),
    _Category(5812, "restaurants", 30, 0.6, 0.8, ((13, 1.2, 1), (20, 1.8, 1.4)), 1.3, 2.2, (7, 1.5, 3, 0), 0.0, "food_delivery", 1.5),
    _Category(5814, "fast_food", 9, 0.5, 0.4, ((12.5, 1.2, 1), (19, 2, 0.7), (0, 2, 0.5)), 1.1, 1.5, (5, 2, 4, 0), 0.0, "food_delivery", 1.0),
    _Category(4111, "transit", 3, 0.6, 0.2, ((8, 1, 1.2), (18, 1.2, 1)), 0.4, 1.6, (5, 0.5, 5, 0), 0.0),
    _Category(4121, "taxi", 14, 0.6, 0.6, ((9, 1.5, 0.6), (19, 2, 0.6), (0, 2.5, 0.8)), 1.2, 2.2, (1, 3, 5, 0), 0.0),
    _Category(5541, "fuel", 40, 0.4, 0.4, ((8, 2, 1), (17, 3, 1)), 1.3, 0.3, (8, 0, 2, 0), 0.0),
    _Category(5732, "electronics", 220, 1.0, 0.9, ((15, 4, 1), (21, 2, 0.6)), 1.2, 0.5, (3, 6, 1, 0), 0.15, "electronics", 0.3),
    _Category(5311, "department_store", 60, 0.8, 0.7, ((14, 3, 1), (18, 2, 0.8)), 1.5, 1.0, (6, 3, 1, 0), 0.05, "home", 2.0),
    _Category(5691, "clothing", 55, 0.7, 0.8, ((15, 3, 1), (20, 2, 0.6)), 1.5, 1.3, (5, 4, 1, 0), 0.15, "fashion", 1.2),
    _Category(5912, "pharmacy", 18, 0.7, 0.3, ((11, 3, 1), (18, 2, 0.8)), 1.0, 0.7, (7, 2, 2, 0), 0.0, "health", 1.0),
    _Category(5999, "misc_retail", 30, 0.9, 0.6, ((13, 5, 1),), 1.2, 1.6, (5, 4, 2, 0), 0.1, "general", 1.0),
    _Category(5815, "digital_goods", 10, 0.6, 0.4, ((21, 3, 1), (1, 2, 0.5)), 1.1, 0.6, (0, 7, 3, 0), 0.5, "digital", 0.0),
    _Category(4814, "telecom", 30, 0.3, 0.3, ((10, 5, 1),), 0.8, 0.05, (1, 5, 4, 0), 0.0),
    _Category(7832, "cinema", 14, 0.4, 0.5, ((19, 2, 1), (22, 1.5, 0.6)), 2.0, 0.4, (4, 4, 2, 0), 0.0),
    _Category(7011, "hotels", 150, 0.6, 0.9, ((15, 5, 1),), 1.2, 8.0, (4, 6, 0.5, 0), 0.6),
    _Category(4511, "airlines", 300, 0.6, 0.9, ((13, 6, 1),), 1.0, 1.0, (0.5, 9, 0.5, 0), 0.3),
    _Category(6011, "atm", 90, 0.6, 0.5, ((10, 3, 1), (18, 3, 1)), 1.0, 1.3, (1, 0, 0, 0), 0.0),
    _Category(4829, "money_transfer", 120, 1.0, 0.6, ((12, 5, 1), (21, 2, 0.5)), 1.0, 0.3, (0, 2, 1, 7), 0.0),
    _Category(7995, "gambling", 25, 1.0, 0.5, ((22, 2.5, 1), (1, 2, 0.6)), 1.3, 0.5, (1, 6, 2, 0), 0.3),
)
MCC_INDEX = {c.mcc: i for i, c in enumerate(CATEGORIES)}


@dataclass(frozen=True)
class _Persona:
    name: str
    share: float  # share of the population
    mix: dict[int, float]  # mcc -> weight of discretionary spending (others get a small floor)
    weekday_hours: tuple[tuple[float, float, float], ...]  # local-hour activity peaks
    weekend_hours: tuple[tuple[float, float, float], ...]
    dow: tuple[float, ...]  # activity by weekday, Monday first
    channels: tuple[float, float, float, float]  # preference multipliers (card_present, ecommerce, wallet, p2p)
    income: float  # mean log income multiplier
    trips: float  # expected trips abroad per 180 days
    payday: float  # start-of-month surge of activity (and of cash / transfers)
    telecom_bill: float  # probability of a monthly telecom bill
    digital_sub: float  # probability of a monthly digital subscription


PERSONAS: tuple[_Persona, ...] = (
    _Persona(
        "commuter", 0.25,
        {5814: 10, 4111: 12, 5812: 8, 4121: 6, 5499: 6, 5411: 8, 5815: 3, 5691: 3, 7832: 2, 5999: 4, 5912: 2, 6011: 2, 5732: 2, 5311: 2},
        ((8, 1, 1), (13, 1, 0.8), (19, 2, 1.2)), ((12, 3, 1), (20, 2, 1)),
        (1.15, 1.15, 1.15, 1.15, 1.1, 0.8, 0.7), (1.0, 1.0, 1.4, 0.7), 0.2, 0.6, 0.3, 0.75, 0.4,
    ),
    _Persona(
        "family", 0.25,
        {5411: 20, 5541: 10, 5912: 6, 5311: 8, 5691: 5, 5812: 4, 5814: 4, 5499: 5, 7832: 2, 5999: 5, 6011: 3, 5732: 2},
        ((10, 3, 1), (18, 2, 1.3)), ((11, 3, 1.3), (17, 3, 1)),
        (0.85, 0.85, 0.85, 0.85, 0.95, 1.5, 1.3), (1.3, 1.0, 0.85, 0.6), 0.1, 0.4, 0.3, 0.8, 0.3,
    ),
    _Persona(
        "night_owl", 0.20,
        {5814: 12, 5815: 10, 5732: 4, 7995: 4, 4121: 6, 5499: 6, 4829: 8, 5691: 5, 7832: 4, 5812: 4, 5411: 5, 5999: 5},
        ((13, 2, 0.6), (22, 2.5, 1.4), (1, 2, 0.8)), ((15, 3, 1), (0, 3, 1.2)),
        (0.95, 0.95, 0.95, 1.0, 1.2, 1.2, 0.9), (0.75, 1.35, 1.3, 1.3), -0.3, 0.2, 0.3, 0.5, 0.7,
    ),
    _Persona(
        "traveller", 0.12,
        {5812: 14, 7011: 5, 4511: 4, 5691: 7, 5311: 6, 5732: 4, 4121: 6, 5411: 8, 5999: 5, 7832: 2, 5815: 3, 5541: 4},
        ((9, 2, 0.8), (13, 1.5, 0.8), (20, 2, 1.1)), ((12, 4, 1),),
        (1.0, 1.0, 1.0, 1.0, 1.05, 1.0, 0.95), (1.15, 1.25, 1.0, 0.6), 0.7, 2.5, 0.2, 0.7, 0.45,
    ),
    _Persona(
        "cash_remitter", 0.18,
        {6011: 14, 4829: 12, 5411: 14, 5499: 8, 4814: 4, 5912: 4, 5541: 4, 5814: 5, 5999: 4, 7995: 3, 4111: 6},
        ((9, 2, 1), (17, 3, 1)), ((11, 3, 1),),
        (1.0, 1.0, 1.0, 1.0, 1.0, 1.05, 0.9), (1.3, 0.7, 0.85, 1.2), -0.5, 0.1, 1.5, 0.85, 0.25,
    ),
)

TRAVELLER = [p.name for p in PERSONAS].index("traveller")  # takes longer trips

# Payment kinds (internal; they decide which follow-up events a payment gets).
NORMAL, BILL, BOOKING, ATO_BURST, RISKY_DECOY, TRIP_SMALL, RETRY, REVERSAL = range(8)
# Device slots per user: known phone, laptop, upgraded phone, a new device (trip / decoy), attacker's.
PHONE, LAPTOP, UPGRADE, NEWDEV, ATTACKER = range(5)
N_SLOTS = 5

_DAY_S = 86_400
_US = 1_000_000
_CHUNK = 1 << 18  # rows per chunk of (events, categories) matrices
_MEAN_FAILURES = 0.7  # failed attempts before the first login on a new device (takeovers and decoys alike)


def _hour_profile(peaks: tuple[tuple[float, float, float], ...], floor: float = 0.05) -> np.ndarray:
    """(24,) distribution over local hours: a floor plus circular Gaussian bumps."""
    h = np.arange(24) + 0.5
    out = np.full(24, floor)
    for center, width, weight in peaks:
        d = np.abs(h - center)
        d = np.minimum(d, 24 - d)
        out += weight * np.exp(-0.5 * (d / width) ** 2)
    return out / out.sum()


class _RowSampler:
    """Draw one column per requested row of a (R, K) weight matrix by inverse CDF, vectorised:
    the per-row CDFs are offset by their row index and flattened, so one `searchsorted` serves
    every row at once."""

    def __init__(self, weights: np.ndarray):
        w = np.asarray(weights, dtype=np.float64)
        self.k = w.shape[1]
        cdf = np.cumsum(w, axis=1)
        cdf /= cdf[:, -1:]
        self.flat = (cdf + np.arange(w.shape[0])[:, None]).ravel()  # (R*K,)

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        idx = np.searchsorted(self.flat, rows + rng.random(rows.size), side="right")
        return np.clip(idx - rows * self.k, 0, self.k - 1)


def _foreign_sampler(attr: str) -> _RowSampler:
    """Sampler of a foreign country for each home country, weighted by a `_Country` attribute."""
    w = np.tile([getattr(c, attr) for c in COUNTRIES], (len(COUNTRIES), 1))
    np.fill_diagonal(w, 0.0)
    return _RowSampler(w)


def _group_cumsum(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at every group of consecutive `sizes` rows."""
    cs = np.cumsum(values)
    nonempty = sizes > 0
    starts = (np.cumsum(sizes) - sizes)[nonempty]  # first row of each non-empty group
    return cs - np.repeat(cs[starts] - values[starts], sizes[nonempty])


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _take(cols: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in cols.items()}


def _parse_start(start: str) -> datetime:
    t = datetime.fromisoformat(start)
    t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def validate(cfg: SynthConfig) -> None:
    """Raise ValueError naming the field when a config value is out of range."""
    n_min_merchants = len(COUNTRIES) * len(CATEGORIES)
    checks = {  # name: (ok, the rule)
        "users": (cfg.users >= 1, ">= 1"),
        "days": (cfg.days >= 14, ">= 14"),
        "horizon_days": (cfg.horizon_days >= 1, ">= 1"),
        "merchants": (cfg.merchants == 0 or cfg.merchants >= n_min_merchants,
                      f"0 (sized from users) or >= {n_min_merchants} (one per country and category)"),
        "payments_per_day": (cfg.payments_per_day > 0, "> 0"),
        "logins_per_day": (cfg.logins_per_day >= 0, ">= 0"),
        "churn_rate": (0 <= cfg.churn_rate <= 1, "in [0, 1]"),
        "ato_rate": (0 <= cfg.ato_rate <= 1, "in [0, 1]"),
        "dirty_fraction": (0 <= cfg.dirty_fraction <= 1, "in [0, 1]"),
        "part_rows": (cfg.part_rows >= 1, ">= 1"),
    }
    for name, (ok, rule) in checks.items():
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is out of range: must be {rule}")
    known = {c.code for c in COUNTRIES}
    bad = sorted(set(cfg.home_countries) - known)
    if bad or not cfg.home_countries or min(cfg.home_countries.values()) < 0 or sum(cfg.home_countries.values()) <= 0:
        raise ValueError(
            f"home_countries={dict(cfg.home_countries)!r} needs non-negative weights over {sorted(known)}"
        )
    try:
        _parse_start(cfg.start)
    except ValueError as e:
        raise ValueError(f"start={cfg.start!r} is not an ISO date ({e})") from None


# ----------------------------------------------------------------------------- the generator


class _World:
    """Builds the world step by step; every array is whole-population (no per-user loops)."""

    def __init__(self, cfg: SynthConfig):
        validate(cfg)
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.U, self.D = cfg.users, cfg.days
        self.t_start = _parse_start(cfg.start)
        self.t_cutoff = self.t_start + timedelta(days=cfg.days)
        self.start_us = int(self.t_start.timestamp()) * _US
        self.cutoff_us = self.start_us + self.D * _DAY_S * _US
        days = np.datetime64(self.t_start.date(), "D") + np.arange(self.D)
        self.dow = ((days.astype(np.int64) + 3) % 7).astype(np.int64)  # (D,) Monday = 0
        self.dom = (days - days.astype("datetime64[M]")).astype(np.int64)  # (D,) day of month, 0-based
        # static tables as arrays
        self.fx = np.array([c.fx for c in COUNTRIES])
        self.price = np.array([c.price for c in COUNTRIES])
        self.utc_off_s = np.array([round(c.utc_offset_h * 3600) for c in COUNTRIES], dtype=np.int64)
        self.cash_unit = np.array([c.cash_unit for c in COUNTRIES])
        self.decimals = np.array([c.decimals for c in COUNTRIES])
        self.C, self.K = len(CATEGORIES), len(COUNTRIES)
        self.cat_usd = np.array([c.usd for c in CATEGORIES])
        self.cat_sigma = np.array([c.sigma for c in CATEGORIES])
        self.cat_elast = np.array([c.elasticity for c in CATEGORIES])
        self.log_cat_hour = np.log(np.stack([_hour_profile(c.hours) for c in CATEGORIES]))  # (C, 24)
        self.log_cat_weekend = np.log([c.weekend for c in CATEGORIES])  # (C,)
        self.log_cat_abroad = np.log([c.abroad for c in CATEGORIES])  # (C,)
        self.cat_channels = np.array([c.channels for c in CATEGORIES])  # (C, 4)
        self.cat_xborder = np.array([c.xborder for c in CATEGORIES])
        cash = np.zeros(self.C)
        cash[[MCC_INDEX[6011], MCC_INDEX[4829]]] = 1.0
        self.cat_cash = cash  # (C,) categories boosted at payday and while a churner fades out
        # foreign-country samplers, one row per home country (never the home country itself)
        self.travel_to = _foreign_sampler("travel")
        self.attacked_from = _foreign_sampler("attacker")
        self.shop_abroad = _foreign_sampler("xborder")

    # ---------------------------------------------------------------- users

    def per_user(self, attr: str) -> np.ndarray:
        """(U,) a persona attribute for every user."""
        return np.array([getattr(p, attr) for p in PERSONAS])[self.persona]

    def users(self) -> None:
        U, D, rng, cfg = self.U, self.D, self.rng, self.cfg
        P = len(PERSONAS)
        self.persona = rng.choice(P, size=U, p=np.array([p.share for p in PERSONAS]))
        codes = list(cfg.home_countries)
        w = np.array([cfg.home_countries[c] for c in codes], dtype=np.float64)
        idx_of = {c.code: i for i, c in enumerate(COUNTRIES)}
        self.home = np.array([idx_of[c] for c in codes])[rng.choice(len(codes), size=U, p=w / w.sum())]
        per = self.per_user
        self.income = np.exp(per("income") + rng.normal(0, 0.5, U))  # (U,) income multiplier
        self.rate = cfg.payments_per_day * np.exp(rng.normal(0, 0.6, U))  # (U,) payments / day
        self.login_rate = cfg.logins_per_day * np.exp(rng.normal(0, 0.5, U))
        self.trend = rng.normal(0, 0.4, U)  # change of log activity over `days` (continues after)
        self.loyalty = rng.uniform(0.3, 0.8, U)
        self.payday = per("payday") * rng.uniform(0.5, 1.5, U)
        # category mix: Dirichlet around the persona mix, blended with the population mix
        pmix = np.full((P, self.C), 0.6)
        for i, p in enumerate(PERSONAS):
            for mcc, wt in p.mix.items():
                pmix[i, MCC_INDEX[mcc]] += wt
        pmix /= pmix.sum(1, keepdims=True)
        own = rng.gamma(pmix[self.persona] * 6.0)  # (U, C) Dirichlet(6 * persona mix)
        own /= own.sum(1, keepdims=True)
        blend = rng.uniform(0.35, 0.75, U)[:, None]
        population = (np.array([p.share for p in PERSONAS]) @ pmix)[None, :]
        self.log_mix = np.log((1 - blend) * own + blend * population)  # (U, C)
        # local-hour activity: persona profile, shifted per user, blended with the population's
        prof = np.stack(
            [np.stack([_hour_profile(p.weekday_hours), _hour_profile(p.weekend_hours)]) for p in PERSONAS]
        )  # (P, 2, 24)
        pop_prof = np.einsum("p,pwh->wh", np.array([p.share for p in PERSONAS]), prof)
        shift = np.clip(np.round(rng.normal(0, 1.2, U)), -3, 3).astype(np.int64)
        hour_idx = (np.arange(24)[None, :] - shift[:, None]) % 24  # (U, 24)
        user_prof = prof[self.persona[:, None, None], np.arange(2)[None, :, None], hour_idx[:, None, :]]
        hb = rng.uniform(0.15, 0.4, U)[:, None, None]
        self.hours = _RowSampler(((1 - hb) * user_prof + hb * pop_prof).reshape(2 * U, 24))  # row 2u + weekend
        self.dow_w = np.array([p.dow for p in PERSONAS])[self.persona] * np.exp(rng.normal(0, 0.12, (U, 7)))
        self.chan_pref = np.array([p.channels for p in PERSONAS])[self.persona] * np.exp(rng.normal(0, 0.4, (U, 4)))
        # join date: 15% of accounts open during the history (at least 30 days before the cut-off)
        late = rng.random(U) < 0.15
        self.join = np.where(late, rng.integers(0, max(1, D - 30), U), 0)
        # devices: a phone, maybe a laptop, maybe a new phone from `upgrade_us` on
        self.has_laptop = rng.random(U) < 0.5
        upgrade = rng.random(U) < 0.25
        self.upgrade_us = np.where(
            upgrade,
            self.start_us + ((self.join + 5 + rng.random(U) * np.maximum(D - self.join - 6, 1)) * _DAY_S * _US).astype(np.int64),
            np.iinfo(np.int64).max,
        )
        self.bio = rng.uniform(0.2, 0.9, U)  # chance a phone login uses biometrics
        self.device_code = rng.permutation(U * N_SLOTS)  # (U * slots,) pseudonymous device numbers
        self.user_code = rng.permutation(U)
        # churn: fading churners (signal), abrupt churners (none), quiet-spell decoys
        self.churn = rng.random(U) < cfg.churn_rate
        self.fading = self.churn & (rng.random(U) < 0.6)
        fade_len = rng.uniform(14, 56, U) * min(1.0, D / 112)
        self.fade_start = np.where(self.fading, np.maximum(D - fade_len, self.join + 7), D + 1.0)
        self.fade_floor = rng.uniform(0.05, 0.35, U)
        self.bill_end_day = np.where(self.fading & (rng.random(U) < 0.5), self.fade_start, D + 1.0)
        self.churn_day = np.where(  # day after the cut-off (0 = cut-off) when churners leave
            self.fading, rng.uniform(0, 7, U), rng.uniform(0, 0.7 * cfg.horizon_days, U)
        )
        quiet = rng.random(U) < 0.15
        qlen = rng.uniform(10, 35, U) * min(1.0, D / 105)
        self.quiet_start = np.where(quiet, rng.uniform(0, D, U) - qlen / 2, D + 1.0)
        self.quiet_end = self.quiet_start + qlen
        self.quiet_floor = rng.uniform(0.05, 0.3, U)

    def trips(self) -> None:
        """0-4 non-overlapping trips per user; `loc` (U, D) = the country the user is in each day."""
        U, D, rng = self.U, self.D, self.rng
        n = np.minimum(rng.poisson(self.per_user("trips") * D / 180), 4)
        user = np.repeat(np.arange(U), n)
        start = rng.integers(self.join[user], D - 1) if user.size else np.zeros(0, np.int64)
        order = np.lexsort((start, user))
        user, start = user[order], start[order]
        dur = 2 + rng.poisson(np.where(self.persona[user] == TRAVELLER, 5.0, 4.0))
        same_next = np.r_[user[1:] == user[:-1], False]
        next_start = np.where(same_next, np.r_[start[1:], 0], D + 1)
        end = np.minimum(np.minimum(start + dur, next_start - 1), D)
        keep = end - start >= 2
        user, start, end = user[keep], start[keep], end[keep]
        dest = self.travel_to(self.home[user], rng)
        diff = np.zeros((U, D + 1), dtype=np.int16)
        np.add.at(diff, (user, start), (dest + 1).astype(np.int16))
        np.add.at(diff, (user, end), -(dest + 1).astype(np.int16))
        on = np.cumsum(diff, axis=1)[:, :D]  # (U, D): dest + 1 on trip days, else 0
        self.loc = np.where(on > 0, on - 1, self.home[:, None]).astype(np.int8)  # (U, D)
        self.trip_user, self.trip_start, self.trip_end, self.trip_dest = user, start, end, dest

    def day_weights(self) -> None:
        """(U, D) relative activity per day; drives when discretionary events happen."""
        D = self.D
        d = np.arange(D, dtype=np.float64)[None, :]
        w = self.dow_w[:, self.dow]  # (U, D) weekly rhythm
        w = w * (1 + self.payday[:, None] * np.exp(-self.dom[None, :] / 3.0))
        w = w * np.exp(self.trend[:, None] * (d - D) / D)
        w = w * np.where(self.loc != self.home[:, None], 1.3, 1.0)
        fade = (d - self.fade_start[:, None]) / np.maximum(D - self.fade_start[:, None], 1)
        w = w * np.where(fade > 0, 1 - (1 - self.fade_floor[:, None]) * np.clip(fade, 0, 1), 1.0)
        quiet = (d >= self.quiet_start[:, None]) & (d < self.quiet_end[:, None])
        w = w * np.where(quiet, self.quiet_floor[:, None], 1.0)
        w = w * (d >= self.join[:, None])
        self.w_total = w.sum(1)  # (U,) expected events at rate 1 / day
        self.days = _RowSampler(w)

    # ---------------------------------------------------------------- helpers

    def local_to_utc(self, day: np.ndarray, local_s: np.ndarray, country: np.ndarray) -> np.ndarray:
        """Epoch microseconds of `local_s` seconds after local midnight of history day `day`."""
        micro = self.rng.integers(0, _US, day.size)
        return self.start_us + (day * _DAY_S + local_s - self.utc_off_s[country]) * _US + micro

    def day_of(self, ts: np.ndarray) -> np.ndarray:
        return np.clip((ts - self.start_us) // (_DAY_S * _US), 0, self.D - 1)

    def where_is(self, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
        return self.loc[user, self.day_of(ts)].astype(np.int64)

    def sample_times(self, user: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Day, local hour and UTC ts (us) for events of `user`, on the user's rhythms."""
        day = self.days(user, self.rng)
        weekend = (self.dow[day] >= 5).astype(np.int64)
        hour = self.hours(2 * user + weekend, self.rng)
        ts = self.local_to_utc(day, hour * 3600 + self.rng.integers(0, 3600, user.size), self.loc[user, day])
        return day, hour, ts

    def device(self, user: np.ndarray, ts: np.ndarray, p_laptop: np.ndarray | float) -> np.ndarray:
        """Device number of an online event: the laptop sometimes, else the current phone; the
        new device during a traveller decoy's trip (windows set by `plan_stories`)."""
        laptop = self.has_laptop[user] & (self.rng.random(user.size) < p_laptop)
        slot = np.where(laptop, LAPTOP, np.where(ts >= self.upgrade_us[user], UPGRADE, PHONE))
        on_trip_dev = (ts >= self.d1_from[user]) & (ts < self.d1_to[user])
        slot = np.where(on_trip_dev, NEWDEV, slot)
        return self.device_code[user * N_SLOTS + slot]

    def merchants(self) -> None:
        """Merchants by (country, category) group, Zipf popularity within each group."""
        rng, K, C = self.rng, self.K, self.C
        G = K * C
        M = self.cfg.merchants or max(2 * G, self.U // 4)  # validate() ensures M >= G
        home_share = np.bincount(self.home, minlength=K) / self.U
        travel = np.array([c.travel for c in COUNTRIES])
        demand = (home_share + 0.05 * travel / travel.sum())[:, None] * np.exp(self.log_mix).mean(0)[None, :]
        base = 2 if M >= 2 * G else 1
        size = base + rng.multinomial(M - base * G, (demand / demand.sum()).ravel())  # (G,) group = country * C + cat
        self.group_start = np.cumsum(size) - size
        self.group_size = size
        rank = _group_cumsum(np.ones(M), size)  # 1..size within each group
        pop = rank ** -1.1
        cum = _group_cumsum(pop, size)
        cdf = cum / np.repeat(cum[self.group_start + size - 1], size)
        self.merchant_cdf = cdf + np.repeat(np.arange(G), size)  # (M,) offset CDF for searchsorted
        self.merchant_code = rng.permutation(M)
        self.M = M
        self.favourite = rng.random((self.U, C))  # (U, C) each user's favourite merchant quantile

    def pick_merchant(self, country: np.ndarray, cat: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
        """Zipf-popular merchant of the group for quantiles `u`; uniform in the group if u is None."""
        g = country * self.C + cat
        if u is None:
            return self.group_start[g] + (self.rng.random(g.size) * self.group_size[g]).astype(np.int64)
        idx = np.searchsorted(self.merchant_cdf, g + u, side="right")
        return np.clip(idx, self.group_start[g], self.group_start[g] + self.group_size[g] - 1)

    def amount(self, usd: np.ndarray, country: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """USD-at-US-prices amounts -> local currency, rounded to the currency (ATM: to notes)."""
        local = usd * self.price[country] * self.fx[country]
        scale = 10.0 ** self.decimals[country]
        local = np.maximum(np.round(local * scale) / scale, 1.0 / scale)
        atm = cat == MCC_INDEX[6011]
        unit = self.cash_unit[country]
        return np.where(atm, np.maximum(np.round(local / unit), 1) * unit, local)

    def usd_amount(self, user: np.ndarray, cat: np.ndarray) -> np.ndarray:
        noise = self.rng.normal(0, 1, user.size) * self.cat_sigma[cat]
        return self.cat_usd[cat] * self.income[user] ** self.cat_elast[cat] * np.exp(noise)

    # ---------------------------------------------------------------- payments

    def discretionary(self) -> dict[str, np.ndarray]:
        """The bulk of payments: day, hour, then category, channel, merchant, amount, device."""
        rng = self.rng
        n = np.maximum(rng.poisson(self.rate * self.w_total), 3)
        user = np.repeat(np.arange(self.U), n)
        day, hour, ts = self.sample_times(user)
        loc = self.loc[user, day].astype(np.int64)
        abroad = loc != self.home[user]
        weekend = self.dow[day] >= 5
        cash_boost = self.payday[user] * np.exp(-self.dom[day] / 3.0) + 1.5 * (day >= self.fade_start[user])
        cat = np.empty(user.size, dtype=np.int64)
        for s in range(0, user.size, _CHUNK):
            sl = slice(s, s + _CHUNK)
            logits = (
                self.log_mix[user[sl]]
                + self.log_cat_hour[:, hour[sl]].T
                + weekend[sl, None] * self.log_cat_weekend[None, :]
                + abroad[sl, None] * self.log_cat_abroad[None, :]
                + cash_boost[sl, None] * self.cat_cash[None, :]
            )  # (chunk, C)
            cat[sl] = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
        chan_w = self.cat_channels[cat] * self.chan_pref[user]  # (n, 4)
        chan_w[:, CP] *= np.where(abroad, 2.5, 1.0)
        chan_w[:, P2P] *= np.where(abroad, 0.2, 1.0)
        cdf = np.cumsum(chan_w, axis=1)
        channel = (cdf < rng.random(user.size)[:, None] * cdf[:, -1:]).sum(1)
        channel = np.minimum(channel, 3)
        # where the merchant is: in-store -> here; online -> home, sometimes abroad; p2p -> home
        foreign = self.shop_abroad(self.home[user], rng)
        online_abroad = rng.random(user.size) < 0.5
        online = np.where(
            abroad & online_abroad,
            loc,
            np.where(rng.random(user.size) < self.cat_xborder[cat], foreign, self.home[user]),
        )
        country = np.where((channel == CP) | (channel == WALLET), loc, np.where(channel == P2P, self.home[user], online))
        loyal = (country == self.home[user]) & (rng.random(user.size) < self.loyalty[user])
        merchant = self.pick_merchant(country, cat, np.where(loyal, self.favourite[user, cat], rng.random(user.size)))
        amount = self.amount(self.usd_amount(user, cat), country, cat)
        device = np.where(channel == CP, -1, self.device(user, ts, np.where(channel == ECOM, 0.4, 0.15)))
        return self._payments(user, ts, cat, channel, country, merchant, amount, device, NORMAL)

    def _payments(self, user, ts, cat, channel, country, merchant, amount, device, kind) -> dict[str, np.ndarray]:
        n = np.asarray(user).size
        return {
            "user": np.asarray(user, np.int64),
            "ts": np.asarray(ts, np.int64),
            "cat": np.broadcast_to(cat, n).astype(np.int64),
            "channel": np.broadcast_to(channel, n).astype(np.int64),
            "country": np.asarray(country, np.int64),
            "merchant": np.asarray(merchant, np.int64),
            "amount": np.asarray(amount, np.float64),
            "device": np.broadcast_to(device, n).astype(np.int64),
            "status": np.full(n, OK, np.int64),
            "kind": np.full(n, kind, np.int64),
        }

    def bills(self) -> dict[str, np.ndarray]:
        """Monthly merchant-initiated bills (telecom, digital subscription): fixed merchant, day of
        month, amount and night-time hour; null device. Fading churners may cancel them."""
        rng, U = self.rng, self.U
        first = np.unique(np.r_[-self.dom[0], np.flatnonzero(self.dom == 0)])  # month starts (day index, may be < 0)
        parts = []
        self.bill_usd = np.zeros(U)  # (U,) monthly bills still running at the cut-off, in USD
        for mcc, attr in ((4814, "telecom_bill"), (5815, "digital_sub")):
            cat = MCC_INDEX[mcc]
            has = rng.random(U) < self.per_user(attr)
            dom = rng.integers(0, 28, U)
            local_s = rng.integers(2 * 3600, 6 * 3600, U)
            usd = self.cat_usd[cat] * self.income ** self.cat_elast[cat] * np.exp(rng.normal(0, self.cat_sigma[cat], U))
            fixed = self.amount(usd, self.home, np.full(U, cat))
            merchant = self.pick_merchant(self.home, np.full(U, cat), self.favourite[:, cat])
            self.bill_usd += np.where(has & (self.bill_end_day > self.D), fixed / self.fx[self.home], 0.0)
            user = np.repeat(np.arange(U), first.size)
            day = (first[None, :] + dom[:, None]).ravel()
            keep = has[user] & (day >= self.join[user]) & (day >= 0) & (day < np.minimum(self.D, self.bill_end_day[user]))
            user, day = user[keep], day[keep]
            ts = self.local_to_utc(day, local_s[user], self.home[user])
            parts.append(
                self._payments(user, ts, cat, ECOM, self.home[user], merchant[user], fixed[user], -1, BILL)
            )
        return _concat(parts)

    def bookings(self) -> dict[str, np.ndarray]:
        """Before most trips: an airline ticket online, then often a hotel minutes later."""
        rng = self.rng
        n_trips = self.trip_user.size
        lead = rng.uniform(3, 45, n_trips)  # days booked ahead
        day = np.floor(self.trip_start - lead).astype(np.int64)
        keep = (rng.random(n_trips) < 0.8) & (day >= self.join[self.trip_user])
        user, day, dest = self.trip_user[keep], day[keep], self.trip_dest[keep]
        home = self.home[user]
        ts = self.local_to_utc(day, rng.integers(8 * 3600, 23 * 3600, user.size), home)
        hotel = rng.random(user.size) < 0.6
        parts = []
        for cat, users_ok, when, country in (
            (MCC_INDEX[4511], np.ones(user.size, bool), ts, np.where(rng.random(user.size) < 0.3, dest, home)),
            (MCC_INDEX[7011], hotel, ts + rng.integers(2 * 60, 30 * 60, user.size) * _US, dest),
        ):
            u, t, c = user[users_ok], when[users_ok], country[users_ok]
            cats = np.full(u.size, cat)
            amount = self.amount(self.usd_amount(u, cats) * 1.5, c, cats)
            merchant = self.pick_merchant(c, cats, rng.random(u.size))
            parts.append(self._payments(u, t, cat, ECOM, c, merchant, amount, self.device(u, t, 0.6), BOOKING))
        return _concat(parts)

    def risky_burst(self, user: np.ndarray, t0: np.ndarray, device: np.ndarray, kind: int) -> dict[str, np.ndarray]:
        """1-5 high-amount online payments minutes apart after t0, to merchants new to the user
        (uniform within their group). Shared by account takeovers and their decoys."""
        rng = self.rng
        n = 1 + np.minimum(rng.poisson(1.2, user.size), 4)
        u = np.repeat(user, n)
        ts = np.repeat(t0, n) + (_group_cumsum(rng.uniform(40, 360, u.size), n) * _US).astype(np.int64)
        p2p = rng.random(u.size) < 0.45
        ecom_cat = np.array([MCC_INDEX[m] for m in (5732, 5999, 7995, 4829)])[
            rng.choice(4, size=u.size, p=[0.35, 0.3, 0.2, 0.15])
        ]
        cat = np.where(p2p, MCC_INDEX[4829], ecom_cat)
        foreign = self.attacked_from(self.home[u], rng)
        country = np.where(~p2p & (rng.random(u.size) < 0.5), foreign, self.home[u])
        usd = np.exp(rng.normal(np.log(500), 0.6, u.size)) * self.income[u] ** 0.5
        amount = self.amount(usd, country, cat)
        merchant = self.pick_merchant(country, cat)
        out = self._payments(u, ts, cat, np.where(p2p, P2P, ECOM), country, merchant, amount, np.repeat(device, n), kind)
        out["status"] = np.where(rng.random(u.size) < 0.3, DECLINED, OK)
        return out

    def declines_and_retries(self, pay: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Declines (low balance / risk), half retried within minutes; refunds days later."""
        rng = self.rng
        user, cat = pay["user"], pay["cat"]
        usd = pay["amount"] / (self.fx[pay["country"]] * self.price[pay["country"]])
        day = self.day_of(pay["ts"])
        low = self.income[user] < 0.7
        logit = (
            -4.2
            + 0.7 * np.log(usd / (20 * self.income[user]))
            + 0.8 * low
            + 0.8 * (low & (self.dom[day] >= 24))
            + 0.6 * (pay["country"] != self.home[user])
        )
        natural = (pay["kind"] != ATO_BURST) & (pay["kind"] != RISKY_DECOY)
        declined = natural & (rng.random(user.size) < 1 / (1 + np.exp(-logit)))
        pay["status"] = np.where(declined, DECLINED, pay["status"])
        # retries: same payment 20 s - 3 min later; one more decline in two
        r = np.flatnonzero((pay["status"] == DECLINED) & (rng.random(user.size) < 0.5))
        retry = _take(pay, r)
        retry["ts"] = retry["ts"] + rng.integers(20, 180, r.size) * _US
        retry["status"] = np.where(rng.random(r.size) < 0.5, OK, DECLINED)
        retry["kind"] = np.full(r.size, RETRY)
        # reversals: refunds of online purchases (clothing most), 1-20 days later
        p_rev = np.where(pay["channel"] == ECOM, np.where(cat == MCC_INDEX[5691], 0.08, 0.02), 0.003)
        ok = (pay["status"] == OK) & (pay["kind"] != BILL) & (rng.random(user.size) < p_rev)
        v = np.flatnonzero(ok)
        rev = _take(pay, v)
        rev["ts"] = rev["ts"] + rng.integers(1 * _DAY_S, 20 * _DAY_S, v.size) * _US
        rev["status"] = np.full(v.size, REVERSED)
        rev["kind"] = np.full(v.size, REVERSAL)
        return _concat([pay, retry, rev])

    # ---------------------------------------------------------------- logins

    def _logins(self, user, ts, device, ip, auth, success) -> dict[str, np.ndarray]:
        n = np.asarray(user).size
        return {
            "user": np.asarray(user, np.int64),
            "ts": np.asarray(ts, np.int64),
            "device": np.broadcast_to(device, n).astype(np.int64),
            "ip": np.broadcast_to(ip, n).astype(np.int64),
            "auth": np.broadcast_to(auth, n).astype(np.int64),
            "success": np.broadcast_to(success, n).astype(bool),
        }

    def habit_auth(self, user: np.ndarray, device: np.ndarray) -> np.ndarray:
        """Auth method on a known device: laptops password (otp sometimes), phones biometric."""
        r = self.rng.random(user.size)
        laptop = device == self.device_code[user * N_SLOTS + LAPTOP]
        phone = np.where(r < self.bio[user], BIOMETRIC, np.where(r < self.bio[user] + 0.7 * (1 - self.bio[user]), PASSWORD, OTP))
        return np.where(laptop, np.where(r < 0.8, PASSWORD, OTP), phone)

    def new_device_login(self, user, ts, device, ip, mean_failures: float) -> dict[str, np.ndarray]:
        """First login on a device: 0-3 failed password attempts, then success (otp or password)."""
        rng = self.rng
        k = np.minimum(rng.poisson(mean_failures, user.size), 3)
        fu = np.repeat(user, k)
        back = _group_cumsum(rng.uniform(10, 120, fu.size), k)
        fails = self._logins(fu, np.repeat(ts, k) - (back * _US).astype(np.int64), np.repeat(device, k), np.repeat(ip, k), PASSWORD, False)
        auth = np.where(rng.random(user.size) < 0.55, OTP, PASSWORD)
        return _concat([fails, self._logins(user, ts, device, ip, auth, True)])

    def with_failures(self, lg: dict[str, np.ndarray], p: float = 0.035) -> dict[str, np.ndarray]:
        """A few logins are preceded by a failed attempt (typo) 10-90 s earlier."""
        f = np.flatnonzero(self.rng.random(lg["user"].size) < p)
        fail = _take(lg, f)
        fail["ts"] = fail["ts"] - self.rng.integers(10, 90, f.size) * _US
        fail["auth"] = np.full(f.size, PASSWORD)
        fail["success"] = np.zeros(f.size, bool)
        return _concat([lg, fail])

    # ---------------------------------------------------------------- the planted stories

    def plan_stories(self) -> None:
        """Pick ATO victims and decoys; set the traveller-decoy device windows used by `device`."""
        rng, U, D = self.rng, self.U, self.D
        never = np.iinfo(np.int64).max
        # traveller decoy: one eligible trip per user, 30% of travellers
        t = self.trip_user.size
        eligible = self.trip_start >= self.join[self.trip_user] + 3
        score = np.where(eligible, rng.random(t), -1.0)
        order = np.lexsort((-score, self.trip_user))
        first = order[np.r_[True, self.trip_user[order][1:] != self.trip_user[order][:-1]]] if t else order
        first = first[score[first] >= 0]
        first = first[rng.random(first.size) < 0.3]
        self.d1_user = self.trip_user[first]
        self.d1_login_us = self.local_to_utc(
            self.trip_start[first], rng.integers(8 * 3600, 22 * 3600, first.size), self.trip_dest[first]
        )
        self.d1_ip = self.trip_dest[first]
        self.d1_from = np.full(U, never)
        self.d1_to = np.full(U, never)
        self.d1_from[self.d1_user] = self.d1_login_us
        self.d1_to[self.d1_user] = self.start_us + self.trip_end[first] * _DAY_S * _US
        # account takeover victims and risky-burst decoys (a moment at least a week after joining)
        self.ato = rng.random(U) < self.cfg.ato_rate
        self.d2 = rng.random(U) < 0.06
        lo = np.minimum(np.maximum(self.join + 7, 14), D // 2).astype(np.float64)
        self.ato_day = lo + rng.random(U) * np.maximum(D - 2 - lo, 1)
        self.d2_day = lo + rng.random(U) * np.maximum(D - 2 - lo, 1)

    def stories(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(payments, logins) of account takeovers and of the decoys."""
        rng = self.rng
        pays, logins = [], []
        # account takeover: attacker's new device, foreign IP, any hour; burst within minutes
        a = np.flatnonzero(self.ato)
        t0 = self.start_us + (self.ato_day[a] * _DAY_S * _US).astype(np.int64)
        ip = self.attacked_from(self.home[a], rng)
        dev = self.device_code[a * N_SLOTS + ATTACKER]
        logins.append(self.new_device_login(a, t0, dev, ip, _MEAN_FAILURES))
        pays.append(self.risky_burst(a, t0, dev, ATO_BURST))
        # traveller decoy: new device abroad at trip start; small local payments, half within minutes
        u = self.d1_user
        dev = self.device_code[u * N_SLOTS + NEWDEV]
        logins.append(self.new_device_login(u, self.d1_login_us, dev, self.d1_ip, _MEAN_FAILURES))
        soon = rng.random(u.size) < 0.5
        su = u[soon]
        ts = self.d1_login_us[soon] + rng.integers(60, 600, su.size) * _US
        cat = np.array([MCC_INDEX[m] for m in (5812, 4121, 4111, 5814)])[rng.integers(0, 4, su.size)]
        country = self.d1_ip[soon]
        amount = self.amount(self.usd_amount(su, cat), country, cat)
        merchant = self.pick_merchant(country, cat, rng.random(su.size))
        pays.append(self._payments(su, ts, cat, WALLET, country, merchant, amount, dev[soon], TRIP_SMALL))
        late = rng.random(u.size) < 0.35
        lu, ldev = u[late], dev[late]
        t_late = self.d1_login_us[late] + (rng.uniform(2, 10, lu.size) * _DAY_S * _US).astype(np.int64)
        t_login = t_late - rng.integers(30, 300, lu.size) * _US
        logins.append(self._logins(lu, t_login, ldev, self.where_is(lu, t_login), self.habit_auth(lu, ldev), True))
        pays.append(self.risky_burst(lu, t_late, ldev, RISKY_DECOY))
        # risky-burst decoy: a login minutes before on a known device (30%: a new device at home)
        b = np.flatnonzero(self.d2)
        t0 = self.start_us + (self.d2_day[b] * _DAY_S * _US).astype(np.int64)
        ip = self.where_is(b, t0)
        fresh = (rng.random(b.size) < 0.3) & (self.d1_from[b] == np.iinfo(np.int64).max) & (ip == self.home[b])
        dev = np.where(fresh, self.device_code[b * N_SLOTS + NEWDEV], self.device(b, t0, 0.3))
        t_login = t0 - rng.integers(30, 300, b.size) * _US
        logins.append(self.new_device_login(b[fresh], t_login[fresh], dev[fresh], ip[fresh], _MEAN_FAILURES))
        known = self._logins(b[~fresh], t_login[~fresh], dev[~fresh], ip[~fresh], self.habit_auth(b[~fresh], dev[~fresh]), True)
        logins.append(known)
        pays.append(self.risky_burst(b, t0, dev, RISKY_DECOY))
        # phone upgrades: the first login on the new phone (wherever the user is that day)
        g = np.flatnonzero(self.upgrade_us < self.cutoff_us)
        ts = self.upgrade_us[g]
        logins.append(self.new_device_login(g, ts, self.device_code[g * N_SLOTS + UPGRADE], self.where_is(g, ts), 0.3))
        return _concat(pays), _concat(logins)

    def logins(self, pay: dict[str, np.ndarray], story_logins: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Logins before online payments (same device, seconds-minutes before) + standalone ones."""
        rng = self.rng
        p = np.select([pay["channel"] == ECOM, pay["channel"] == WALLET, pay["channel"] == P2P], [0.75, 0.35, 0.85], 0.0)
        pre = np.isin(pay["kind"], (NORMAL, BOOKING)) & (pay["device"] >= 0) & (rng.random(p.size) < p)
        user, dev = pay["user"][pre], pay["device"][pre]
        ts = pay["ts"][pre] - rng.integers(15, 600, user.size) * _US
        before = self._logins(user, ts, dev, self.where_is(user, ts), self.habit_auth(user, dev), True)
        n = rng.poisson(self.login_rate * self.w_total)
        user = np.repeat(np.arange(self.U), n)
        _, _, ts = self.sample_times(user)
        dev = self.device(user, ts, 0.3)
        alone = self._logins(user, ts, dev, self.where_is(user, ts), self.habit_auth(user, dev), True)
        lg = self.with_failures(_concat([before, alone]))
        lg["ip"] = np.where(rng.random(lg["ip"].size) < 0.01, -1, lg["ip"])  # unknown IP geolocation
        return _concat([lg, story_logins])

    def orders(self, pay: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Orders placed 30 s - 20 min before most online retail payments (same merchant, amount)."""
        rng = self.rng
        has_order = np.array([c.order is not None for c in CATEGORIES])
        items = np.array([c.items for c in CATEGORIES])
        sel = (
            (pay["channel"] == ECOM)
            & has_order[pay["cat"]]
            & np.isin(pay["kind"], (NORMAL, ATO_BURST, RISKY_DECOY))
            & (rng.random(pay["user"].size) < 0.8)
        )
        idx = np.flatnonzero(sel)
        cat = pay["cat"][idx]
        return {
            "user": pay["user"][idx],
            "ts": pay["ts"][idx] - rng.integers(30, 1200, idx.size) * _US,
            "merchant": pay["merchant"][idx],
            "amount": pay["amount"][idx],
            "n_items": 1 + rng.poisson(items[cat]),
            "cat": cat,
        }

    # ---------------------------------------------------------------- labels

    def labels(self) -> dict[str, np.ndarray]:
        """Outcomes over the horizon after the cut-off (simulated, never written as events)."""
        rng, U, H, D = self.rng, self.U, self.cfg.horizon_days, self.D
        payday = 1 + self.payday * np.exp(-np.arange(30) / 3.0).mean()
        level = self.dow_w.mean(1) * payday * np.exp(self.trend * (H / 2) / D)  # (U,) rate multiplier
        level = np.where(self.fading, level * self.fade_floor, level)
        quiet = np.clip(self.quiet_end - D, 0, H) / H  # share of the horizon still in a quiet spell
        level = level * (1 - (1 - self.quiet_floor) * quiet)
        active = np.where(self.churn, np.minimum(self.churn_day, H), H)  # (U,) days before leaving
        n = rng.poisson(self.rate * level * active)
        user = np.repeat(np.arange(U), n)
        cat = _RowSampler(np.exp(self.log_mix))(user, rng)
        usd = self.usd_amount(user, cat) * self.price[self.home[user]]  # USD equivalent at home prices
        spend = np.bincount(user, weights=usd, minlength=U) + self.bill_usd * active / 30
        return {
            "segment": self.persona.astype(np.int32),
            "churn": self.churn.astype(np.int32),
            "ato": self.ato.astype(np.int32),
            "future_spend": np.log1p(spend),
        }


# ----------------------------------------------------------------------------- Arrow tables


def _strings(prefix: str, codes: np.ndarray, width: int) -> pa.Array:
    """`prefix` + zero-padded code; code < 0 -> null."""
    arr = pa.array(codes, mask=codes < 0).cast(pa.string())
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(arr, width, "0"), "")


def _categorical(values: tuple[str, ...], codes: np.ndarray) -> pa.Array:
    """Codes into `values` (code < 0 -> null) as a plain string array."""
    idx = pa.array(codes.astype(np.int32), mask=codes < 0)
    return pa.DictionaryArray.from_arrays(idx, pa.array(values)).cast(pa.string())


def _width(n: int, least: int) -> int:
    return max(least, len(str(max(n - 1, 0))))


def _tables(w: _World, pay: dict, lg: dict, od: dict) -> dict[str, pa.Table]:
    """Internal columns -> contract tables, rows in a shuffled order, event ids pseudonymous."""
    rng = w.rng
    uw, dw, mw = _width(w.U, 6), _width(w.U * N_SLOTS, 7), _width(w.M, 5)
    country_codes = tuple(c.code for c in COUNTRIES)
    currency_codes = tuple(c.currency for c in COUNTRIES)
    ts_type = canonical_schema("payments").field("ts").type
    out = {}
    for source, cols, prefix in (("payments", pay, "p"), ("logins", lg, "l"), ("orders", od, "o")):
        n = cols["user"].size
        order = rng.permutation(n)
        c = {k: v[order] for k, v in cols.items()}
        common = {
            "event_id": _strings(prefix, rng.permutation(n), _width(n, 9)),
            "user_id": _strings("u", w.user_code[c["user"]], uw),
            "ts": pa.array(c["ts"], type=ts_type),
        }
        if source == "payments":
            # a few online payments carry no country (unresolved merchant location)
            country = np.where((c["channel"] == ECOM) & (rng.random(n) < 0.005), -1, c["country"])
            extra = {
                "amount": pa.array(c["amount"], pa.float64()),
                "currency": _categorical(currency_codes, c["country"]),
                "merchant_id": _strings("m", w.merchant_code[c["merchant"]], mw),
                "mcc": pa.array(np.array([k.mcc for k in CATEGORIES], np.int32)[c["cat"]]),
                "channel": _categorical(CHANNELS, c["channel"]),
                "status": _categorical(STATUSES, c["status"]),
                "device_id": _strings("d", c["device"], dw),
                "country": _categorical(country_codes, country),
            }
        elif source == "logins":
            extra = {
                "device_id": _strings("d", c["device"], dw),
                "ip_country": _categorical(country_codes, c["ip"]),
                "auth_method": _categorical(AUTH_METHODS, c["auth"]),
                "success": pa.array(c["success"], pa.bool_()),
            }
        else:
            extra = {
                "merchant_id": _strings("m", w.merchant_code[c["merchant"]], mw),
                "amount": pa.array(c["amount"], pa.float64()),
                "n_items": pa.array(c["n_items"].astype(np.int32)),
                "category": _categorical(tuple(k.order or "" for k in CATEGORIES), c["cat"]),
            }
        out[source] = pa.Table.from_pydict({**common, **extra}, schema=canonical_schema(source))
    return out


DIRTY_KINDS: dict[str, tuple[str, ...]] = {
    "payments": (
        "duplicate", "null_event_id", "null_user_id", "null_ts", "ts_out_of_range",
        "amount_nan", "amount_inf", "amount_zero", "amount_negative", "mcc_invalid", "conflicting_event_id",
    ),
    "logins": ("duplicate", "null_event_id", "null_user_id", "null_ts", "ts_out_of_range", "conflicting_event_id"),
    "orders": (
        "duplicate", "null_event_id", "null_user_id", "null_ts", "ts_out_of_range",
        "amount_nan", "amount_negative", "n_items_zero", "conflicting_event_id",
    ),
}


def _dirty(table: pa.Table, source: str, fraction: float, rng: np.random.Generator, cutoff_us: int) -> tuple[pa.Table, dict[str, int]]:
    """Append round(fraction * rows) invalid copies of random rows, cycling through the kinds;
    the result is reshuffled. Returns the table and the count per kind."""
    n = round(fraction * table.num_rows)
    if n == 0 or table.num_rows == 0:
        return table, {}
    kinds = DIRTY_KINDS[source]
    kind = np.arange(n) % len(kinds)
    bad = table.take(pa.array(rng.integers(0, table.num_rows, n)))
    cols = {name: bad.column(name).combine_chunks() for name in bad.column_names}

    def hit(k: str) -> pa.Array:
        return pa.array(kind == kinds.index(k))

    for k, col in (("null_event_id", "event_id"), ("null_user_id", "user_id"), ("null_ts", "ts")):
        cols[col] = pc.if_else(hit(k), pa.scalar(None, cols[col].type), cols[col])
    far = np.where(rng.random(n) < 0.5, 31_536_000 * _US, cutoff_us + 40 * 31_536_000 * _US)  # 1971 or +40 y
    ts = pc.fill_null(pc.cast(cols["ts"], pa.int64()), 0).to_numpy()
    ts = np.where(kind == kinds.index("ts_out_of_range"), far, ts)
    cols["ts"] = pa.array(ts, type=cols["ts"].type, mask=pc.is_null(cols["ts"]).to_numpy(zero_copy_only=False))
    if "amount" in cols:
        amount = cols["amount"].to_numpy(zero_copy_only=False).copy()
        for k, value in (("amount_nan", np.nan), ("amount_inf", np.inf), ("amount_zero", 0.0)):
            if k in kinds:
                amount[kind == kinds.index(k)] = value
        neg = kind == kinds.index("amount_negative")
        amount[neg] = -np.abs(amount[neg])
        conflict = kind == kinds.index("conflicting_event_id")
        amount[conflict] = np.round(amount[conflict] * 1.37 + 1, 2)  # same id, different content
        cols["amount"] = pa.array(amount)
    if "mcc" in cols:
        mcc = cols["mcc"].to_numpy(zero_copy_only=False).copy()
        mcc[kind == kinds.index("mcc_invalid")] = 12345
        cols["mcc"] = pa.array(mcc, pa.int32())
    if "n_items" in cols:
        items = cols["n_items"].to_numpy(zero_copy_only=False).copy()
        items[kind == kinds.index("n_items_zero")] = 0
        cols["n_items"] = pa.array(items, pa.int32())
    if "success" in cols:
        cols["success"] = pc.if_else(hit("conflicting_event_id"), pc.invert(cols["success"]), cols["success"])
    bad = pa.Table.from_pydict(cols, schema=table.schema)
    both = pa.concat_tables([table, bad])
    counts = {k: int((kind == i).sum()) for i, k in enumerate(kinds)}
    return both.take(pa.array(rng.permutation(both.num_rows))), counts


# ----------------------------------------------------------------------------- public API

LABEL_DOCS: dict[str, dict[str, Any]] = {
    "segment": {
        "type": "multiclass",
        "classes": [p.name for p in PERSONAS],
        "description": "latent persona; shows only through category mix, hour/weekday rhythm, channel mix and payday surges",
    },
    "churn": {
        "type": "binary",
        "description": "leaves during the horizon after the cut-off; 60% of churners fade out first (activity decays, cash-out mix, bills cancelled), 40% leave without warning",
    },
    "ato": {
        "type": "binary",
        "description": "account takeover: login from a new device in a foreign IP country followed within minutes by high-amount online/p2p payments to new merchants",
    },
    "future_spend": {
        "type": "numeric",
        "description": "log1p of USD-equivalent spend in the horizon after the cut-off (0 after churning)",
    },
}


def generate_world(cfg: SynthConfig) -> dict[str, Any]:
    """Build the world in memory.

    Returns {"payments", "logins", "orders": pa.Table with exactly `canonical_schema(source)`,
    rows shuffled; "labels": pa.Table (user_id, segment, churn, ato, future_spend), one row per
    user sorted by user_id; "meta": dict (cutoff, seed, counts, label docs, config)}.
    """
    w = _World(cfg)
    w.users()
    w.trips()
    w.day_weights()
    w.merchants()
    w.plan_stories()
    story_pay, story_logins = w.stories()
    pay = _concat([w.discretionary(), w.bills(), w.bookings(), story_pay])
    pay = w.declines_and_retries(pay)
    lg = w.logins(pay, story_logins)
    od = w.orders(pay)
    # derived events (retries, refunds, logins before a payment...) may spill out of the window
    pay, lg, od = (
        _take(t, np.flatnonzero((t["ts"] >= w.start_us) & (t["ts"] < w.cutoff_us))) for t in (pay, lg, od)
    )
    tables = _tables(w, pay, lg, od)
    events = {s: t.num_rows for s, t in tables.items()}
    dirty = {}
    for s in RAW_SOURCES:
        tables[s], dirty[s] = _dirty(tables[s], s, cfg.dirty_fraction, w.rng, w.cutoff_us)
    lab = w.labels()
    user_ids = _strings("u", w.user_code, _width(w.U, 6))
    labels = pa.table(
        {
            "user_id": user_ids,
            "segment": pa.array(lab["segment"]),
            "churn": pa.array(lab["churn"]),
            "ato": pa.array(lab["ato"]),
            "future_spend": pa.array(lab["future_spend"]),
        }
    ).sort_by("user_id")
    config = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite")}
    label_docs = {name: dict(doc) for name, doc in LABEL_DOCS.items()}
    for name in ("churn", "ato"):
        label_docs[name]["prevalence"] = round(float(lab[name].mean()), 4)
    label_docs["segment"]["shares"] = np.round(np.bincount(lab["segment"], minlength=len(PERSONAS)) / w.U, 4).tolist()
    label_docs["future_spend"]["mean"] = round(float(lab["future_spend"].mean()), 4)
    meta = {
        "generator": f"data_prep.synth {GENERATOR_VERSION}",
        "seed": cfg.seed,
        "users": w.U,
        "merchants": w.M,
        "start": _iso(w.t_start),
        "cutoff": _iso(w.t_cutoff),
        "horizon_days": cfg.horizon_days,
        "events": events,
        "rows": {s: t.num_rows for s, t in tables.items()},
        "dirty": dirty,
        "labels": label_docs,
        "stories": {
            "ato": int(w.ato.sum()),
            "decoy_trip_new_device": int(w.d1_user.size),
            "decoy_risky_burst": int(w.d2.sum()),
            "phone_upgrades": int((w.upgrade_us < w.cutoff_us).sum()),
            "churn_fading": int(w.fading.sum()),
            "churn_abrupt": int((w.churn & ~w.fading).sum()),
            "quiet_spells": int((w.quiet_start < w.D).sum()),
            "trips": int(w.trip_user.size),
        },
        "config": config,
    }
    return {**tables, "labels": labels, "meta": meta}


OUTPUTS = (*RAW_SOURCES, "labels.parquet", "world.json")


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty `out_dir` unless `overwrite` (then only our outputs are replaced)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out={out} is not empty; pass overwrite=true to replace it")


def write_world(world: dict[str, Any], out_dir: str | Path, overwrite: bool = False, part_rows: int = 500_000) -> list[Path]:
    """Write `generate_world`'s result to `out_dir`; returns the files written.

    Event tables go to `<source>/part-NNNNN.parquet` (about `part_rows` rows each, at least one
    file even when empty), labels to `labels.parquet`, meta to `world.json`. Writer options are
    fixed so the same world always gives the same bytes.
    """
    check_out_dir(out_dir, overwrite)
    out = Path(out_dir)
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    written = []
    opts = {"compression": "zstd", "compression_level": 3, "use_dictionary": True, "write_statistics": True}
    for source in RAW_SOURCES:
        table = world[source]
        (out / source).mkdir(parents=True)
        n_parts = max(1, math.ceil(table.num_rows / part_rows))
        bounds = np.linspace(0, table.num_rows, n_parts + 1).round().astype(int)
        for i in range(n_parts):
            path = out / source / f"part-{i:05d}.parquet"
            pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), path, row_group_size=131_072, **opts)
            written.append(path)
    pq.write_table(world["labels"], out / "labels.parquet", **opts)
    (out / "world.json").write_text(json.dumps(world["meta"], indent=2, sort_keys=True) + "\n")
    return [*written, out / "labels.parquet", out / "world.json"]
