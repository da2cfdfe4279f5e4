"""The budget ledger: what each tenant and everyone together spent today and this month. No I/O.

Spending is counted per scope (``global``, and ``tenant-<tenant>`` for each tenant) and period (``daily``:
the UTC day, ``monthly``: the UTC month), whether or not a limit is set. A request is refused while any
of its scopes has spent its limit (``BudgetExceeded``, Retry-After = until the period starts again).

A budget counts every site's spending. Each site writes only its own (``budgets`` key
``<scope>.<period>.<site>``, see ``shared/budgets.py``) and learns the others' from the hub, so a site keeps
counting offline and no write waits on the uplink. An account holds what this site's bucket says (``known``,
updated by a watcher), what this adapter spent and has not yet written (``pending``), and what every other
site spent as last heard (``others``).

Several adapters of a site share its entries: each adds its pending spend with a compare-and-set every
second. The adapter whose write takes a scope's total across its warning level (80% by default) or its
limit reports that crossing, so each is reported once per site. Between two writes other adapters'
spending is up to a second late (another site's: also the time its uplink is down); a request that started
before a budget ran out is still answered, so a budget can be overrun by what is in flight or unheard of.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from schemas.cloud import BudgetLevel, BudgetStatus, budget_window
from services.cloud_adapter.config import BudgetLimits, Budgets
from shared import subjects
from shared.budgets import SEVERITY, exceeded, key_site, seconds_left

Period = Literal["daily", "monthly"]
PERIODS: tuple[Period, ...] = ("daily", "monthly")


def window(period: Period, now: float) -> str:
    """The period that ``now`` falls in: ``2026-11-21`` (daily) or ``2026-11`` (monthly), UTC."""
    return budget_window(period, now)


def level(spent: float, limit: float | None, warn_ratio: float) -> BudgetLevel:
    """``ok``, ``warning`` (at or over the warning level) or ``exhausted`` (at or over the limit)."""
    if limit is None:
        return "ok"
    if spent >= limit:
        return "exhausted"
    return "warning" if spent >= warn_ratio * limit else "ok"


@dataclass
class Account:
    """One scope and period: what this site's bucket says, what this adapter has not written yet, and what
    the other sites spent."""

    scope: str
    period: Period
    window: str
    limit: float | None
    site: str
    known: float = 0.0
    pending: float = 0.0
    revision: int = 0
    others: dict[str, tuple[str, float]] = field(default_factory=dict)  # site → (window, spent), as last heard
    elsewhere: float = 0.0  # what the other sites spent in this window
    restate: bool = False  # the bucket's entry says another limit than the configured one: to be written again

    def __post_init__(self) -> None:
        self._add_up()

    @property
    def key(self) -> str:
        """Its key in the ``budgets`` bucket."""
        return subjects.budget_key(self.scope, self.period, self.site)

    @property
    def spent(self) -> float:
        """Spent in the current window by every site, as far as this adapter knows."""
        return self.known + self.pending + self.elsewhere

    def heard(self, site: str, window: str, spent: float) -> None:
        """What another site has spent (in ``window``)."""
        self.others[site] = (window, spent)
        self._add_up()

    def forget(self, site: str) -> None:
        """Another site's entry is gone."""
        if self.others.pop(site, None) is not None:
            self._add_up()

    def _add_up(self) -> None:
        self.elsewhere = sum(spent for window, spent in self.others.values() if window == self.window)


class Ledger:
    """Every account this adapter knows, with the configured limits."""

    def __init__(self, budgets: Budgets, site: str, clock: Callable[[], float] = time.time) -> None:
        self.budgets = budgets
        self.site = site
        self._clock = clock
        self.accounts: dict[str, Account] = {}
        self._by_tenant: dict[str, tuple[str, list[Account]]] = {}

    def configure(self, budgets: Budgets) -> None:
        """New limits (a providers file reloaded): every account known keeps what it spent, with its new limit,
        written to the bucket at the next flush (the routers read the limit and level there: a tenant refused
        under the old limit is let in again at once under a higher one)."""
        self.budgets = budgets
        for acct in self.accounts.values():
            limit = self._limits(acct.scope).limit(acct.period)
            if limit != acct.limit:
                acct.limit, acct.restate = limit, True

    def _limits(self, scope: str) -> BudgetLimits:
        if scope == subjects.GLOBAL_SCOPE:
            return self.budgets.global_
        for tenant, limits in self.budgets.tenants.items():
            if subjects.tenant_scope(tenant) == scope:
                return limits
        return self.budgets.tenant_default

    def _window(self, period: Period) -> str:
        """The current window of ``period`` by this ledger's clock."""
        return window(period, self._clock())

    def account(self, scope: str, period: Period) -> Account:
        """The account of a scope in the current window (a new window starts from zero)."""
        now_window = self._window(period)
        key = subjects.budget_key(scope, period, self.site)
        acct = self.accounts.get(key)
        if acct is None or acct.window != now_window:
            pending, others = (acct.pending, acct.others) if acct is not None else (0.0, {})
            acct = Account(scope, period, now_window, self._limits(scope).limit(period), self.site,
                           pending=pending, others=others)
            self.accounts[key] = acct
        return acct

    def _accounts_of(self, tenant: str) -> list[Account]:
        """The global and the tenant's accounts, daily and monthly: looked up once a day per tenant (every
        request is checked and charged)."""
        day = self._window("daily")
        known = self._by_tenant.get(tenant)
        if known is not None and known[0] == day:
            return known[1]
        accounts = [self.account(scope, period)
                    for scope in (subjects.GLOBAL_SCOPE, subjects.tenant_scope(tenant)) for period in PERIODS]
        self._by_tenant[tenant] = (day, accounts)
        return accounts

    def check(self, tenant: str) -> None:
        """Raise ``BudgetExceeded`` when the tenant's or the global budget is spent: naming, of those spent, the
        one that resets last (its Retry-After is when the tenant can be served again: a spent day under a spent
        month waits for the month)."""
        spent = [a for a in self._accounts_of(tenant) if a.limit is not None and a.spent >= a.limit]
        if spent:
            now = self._clock()
            acct = max(spent, key=lambda a: seconds_left(a.period, now))
            assert acct.limit is not None
            raise exceeded(tenant, acct.scope, acct.period, acct.limit, acct.spent, acct.window, now)

    def charge(self, tenant: str, cost_usd: float) -> None:
        """Count what a call cost against its tenant and the global scope."""
        if cost_usd <= 0:
            return
        for acct in self._accounts_of(tenant):
            acct.pending += cost_usd

    def seen(self, status: BudgetStatus, revision: int) -> None:
        """An entry as a bucket holds it now (from a watcher): this site's (other adapters' spending becomes
        known), another site's, or one written before budgets counted sites (what this site spent before)."""
        if status.period not in PERIODS:
            return
        acct = self.account(status.scope, status.period)
        if status.site != self.site:
            acct.heard(status.site or "", status.window, status.spent_usd)
        elif status.window == acct.window and revision > acct.revision:
            acct.known, acct.revision = status.spent_usd, revision
            # written under other limits (before a restart with a new providers file): the bucket is told ours
            acct.restate = status.limit_usd != acct.limit

    def cleared(self, key: str) -> None:
        """A bucket no longer holds ``key`` (deleted, or the bucket was reset): nothing known spent there."""
        parts = key.split(".")
        if len(parts) not in (2, 3):
            return
        acct = self.accounts.get(subjects.budget_key(parts[0], parts[1], self.site))
        if acct is None:
            return
        site = key_site(key)
        if site == self.site:
            acct.known, acct.revision = 0.0, 0
        else:
            acct.forget(site or "")

    def forget_revisions(self) -> None:
        """The bucket was created anew: its revisions count from 1 again."""
        for acct in self.accounts.values():
            acct.revision = 0

    def due(self) -> list[Account]:
        """Accounts with spending to write, or a limit; the months first: a router reading the entries as they
        are written then never sees a spent day without its spent month, and says Retry-After: tomorrow."""
        due = [a for a in self.accounts.values() if a.pending > 0 or a.restate]
        return sorted(due, key=lambda a: -PERIODS.index(a.period))

    def status(self, acct: Account, spent: float) -> BudgetStatus:
        """This site's entry of an account when the site has spent ``spent``."""
        total = spent + acct.elsewhere
        return BudgetStatus(scope=acct.scope, period=acct.period, window=acct.window, spent_usd=spent,
                            limit_usd=acct.limit, state=level(total, acct.limit, self.budgets.warn_ratio),
                            updated_at=self._clock(), site=self.site, total_usd=total)

    def written(self, acct: Account, amount: float, before: float, after: float, revision: int) -> list[BudgetLevel]:
        """Record a successful write of ``amount`` (this site's entry went from ``before`` to ``after``); the
        levels every site's total crossed into, in order (a jump from under the warning level to over the
        limit crossed both: an alert on warnings hears of it too)."""
        acct.pending = max(0.0, acct.pending - amount)
        acct.known, acct.revision, acct.restate = after, revision, False
        old = level(before + acct.elsewhere, acct.limit, self.budgets.warn_ratio)
        new = level(after + acct.elsewhere, acct.limit, self.budgets.warn_ratio)
        return [crossed for crossed, rank in SEVERITY.items() if SEVERITY[old] < rank <= SEVERITY[new]]
