"""Reconcile: ask Braze what it holds for each held event or purchase, and judge each row by it.

Its own module because this is the one mode that decides from evidence rather than from a person's
word: the rule below, the export requests (``POST /users/export/ids``, permission
``users.export.ids``) and the reasons a row stays held. `release.py` holds the modes, the delivery
lock around them, the report and the command line, and calls `reconcile` with the lock held.

Reconcile's rule, per held row for user U, event name (or product_id) N and time T (the object's
``time``, which is UPDATED_AT when the payload had none), compared to the second, from the
``first``/``last``/``count`` Braze keeps per user and name:

* proven **missing** (resent): U does not exist, U has no N, U's last N is before T, or U's first
  N is after T. An occurrence at T would make ``first <= T <= last``.
* shown **arrived** (settled as accepted): U's last (or first) N is exactly T, and no other held
  row of the sync names the same U, N and second. Braze then holds an occurrence at exactly that
  second; we take it as this row's. (It could belong to another row with the same user, name and
  second that was delivered before, or to another source: the one case this rule gets wrong.)
* otherwise it **stays held**, with the reason: Braze shows N both before and after T (``Braze
  shows a later N for this user; cannot tell``), several held rows share the user, name and
  second, Braze did not answer, or no copy of the row's event was kept.

Email and phone may name several users: missing only if missing for each, arrived only if no
user leaves it undecided. Braze processes ``/users/track`` asynchronously: reconcile a while after
the run, not seconds after it. Attributes and deletions cannot be reconciled (Braze keeps no trace
of an update or a deletion to compare; a second copy of them is harmless: use ``resend``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from braze_assets.braze.client import BrazeAuthError, BrazeClient
from braze_assets.state import StateStore, alias_key

if TYPE_CHECKING:
    from braze_assets.release import ReleaseReport

EXPORT_PATH = "/users/export/ids"
#: [EXPORT] external_ids and user_aliases per request
EXPORT_MAX_IDS = 50
#: export requests in flight at once (Braze's default limit is 250 requests per minute)
EXPORT_IN_FLIGHT = 4
RECONCILABLE = ("events", "purchases")
_FIELD = {"event": "custom_events", "purchase": "purchases"}

# Reasons a reconciled row stays held (the ledger keeps the sentence; the report counts each).
LATER = "Braze shows a later {name} for this user; cannot tell"
SHARED = (
    "{count} held rows share this user, {name} and second, and Braze shows {name} at that "
    "second; cannot tell which arrived"
)
NO_ANSWER = "Braze did not answer the export ({why}); cannot tell"
NO_DETAILS = (
    "no copy of this row's event was kept (held before reconcile existed, or its delta "
    "file was gone); choose resend or mark_delivered"
)
UNREADABLE = "Braze's answer for {name} has no readable first/last time; cannot tell"


def reconcile(
    store: StateStore,
    rows: list[dict],
    client: Callable[[], BrazeClient],
    report: ReleaseReport,
    decided_by: str,
    stamp: str,
) -> None:
    """Settle, resend or leave held each of `rows` by what Braze's export shows (the rule above), and
    fill `report`. The caller holds the sync's delivery lock, so no run changes the rows meanwhile."""
    everyone = store.held_rows()  # a shared user, name and second counts across all held rows
    sharing = Counter(_moment(r) for r in everyone if r["kind"] is not None)
    asked = [r for r in rows if r["kind"] is not None]
    answers, failures = asyncio.run(_ask_braze(client, asked, report))
    missing: list[str] = []
    arrived: dict[str, str] = {}
    held: dict[str, str] = {}
    reasons: Counter[str] = Counter()
    for row in rows:
        if row["kind"] is None:
            held[row["row_hash"]] = NO_DETAILS
            reasons["no copy of the event kept"] += 1
            continue
        who = (row["id_type"], row["id_value"])
        if who in failures:
            held[row["row_hash"]] = NO_ANSWER.format(why=failures[who])
            reasons["Braze did not answer"] += 1
            continue
        verdict = _verdict(row, answers.get(who, []))
        name = row["name"]
        when = _second(row["sent_time"]).strftime("%Y-%m-%dT%H:%M:%SZ")
        if verdict == "missing":
            missing.append(row["row_hash"])
        elif verdict == "shown" and sharing[_moment(row)] == 1:
            arrived[row["row_hash"]] = (
                f"reconciled by {decided_by} on {stamp}: Braze shows {name} for this user at "
                f"{when} (/users/export/ids); settled as accepted, never sent again"
            )
        elif verdict == "shown":
            held[row["row_hash"]] = SHARED.format(count=sharing[_moment(row)], name=name)
            reasons["several held rows share the user, name and second"] += 1
        elif verdict == "unreadable":
            held[row["row_hash"]] = UNREADABLE.format(name=name)
            reasons["Braze's times unreadable"] += 1
        else:
            held[row["row_hash"]] = LATER.format(name=name)
            reasons["Braze shows a later occurrence; cannot tell"] += 1
    report.marked_delivered = store.mark_held_delivered(arrived)
    report.resent = store.release_held(missing) if missing else 0
    store.note_held(held)
    report.still_held = len(held)
    report.still_held_reasons = dict(reasons.most_common())


def _second(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC).replace(microsecond=0)


def _moment(row: dict) -> tuple:
    return row["id_type"], row["id_value"], row["kind"], row["name"], _second(row["sent_time"])


def _braze_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return _second(parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC))


def _verdict(row: dict, users: list[dict]) -> str:
    """missing | shown | later | unreadable, for one held row and the users Braze returned for
    its identifier (see the module docstring)."""
    wanted = _second(row["sent_time"])
    verdicts = []
    for user in users:
        aggregate = next(
            (
                a
                for a in user.get(_FIELD[row["kind"]]) or []
                if isinstance(a, dict) and a.get("name") == row["name"]
            ),
            None,
        )
        if aggregate is None:
            verdicts.append("missing")
            continue
        first, last = _braze_time(aggregate.get("first")), _braze_time(aggregate.get("last"))
        if first is None or last is None:
            verdicts.append("unreadable")
        elif last < wanted or first > wanted:
            verdicts.append("missing")
        elif wanted in (first, last):
            verdicts.append("shown")
        else:
            verdicts.append("later")
    if all(v == "missing" for v in verdicts):  # no user at all is missing too
        return "missing"
    for undecided in ("unreadable", "later"):
        if undecided in verdicts:
            return undecided
    return "shown"


def _export_bodies(rows: list[dict]) -> list[tuple[dict, list[tuple[str, str]]]]:
    """The export requests that ask about every identity of `rows`, each with those identities:
    up to 50 external_ids or user_aliases per request, one braze_id, email or phone."""
    fields = sorted({"external_id", "user_aliases", "braze_id"} | {_FIELD[r["kind"]] for r in rows})
    identities = sorted({(r["id_type"], r["id_value"]) for r in rows})
    bodies: list[tuple[dict, list[tuple[str, str]]]] = []
    for id_type, key in (("external_id", "external_ids"), ("user_alias", "user_aliases")):
        values = [who for who in identities if who[0] == id_type]
        for start in range(0, len(values), EXPORT_MAX_IDS):
            chunk = values[start : start + EXPORT_MAX_IDS]
            ids = [v if id_type == "external_id" else orjson.loads(v) for _, v in chunk]
            bodies.append(({key: ids, "fields_to_export": fields}, chunk))
    single = {"braze_id": "braze_id", "email": "email_address", "phone": "phone"}
    for who in identities:
        if who[0] in single:
            bodies.append(({single[who[0]]: who[1], "fields_to_export": fields}, [who]))
    return bodies


def _owners(user: dict, asked: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Which of the identities a request asked about this returned user is."""
    if len(asked) == 1 and asked[0][0] in ("braze_id", "email", "phone"):
        return asked  # one identity per request: every user returned is one of its users
    mine = set()
    if isinstance(user.get("external_id"), str):
        mine.add(("external_id", user["external_id"]))
    for alias in user.get("user_aliases") or []:
        if isinstance(alias, dict):
            mine.add(("user_alias", alias_key(alias.get("alias_name"), alias.get("alias_label"))))
    return [who for who in asked if who in mine]


async def _ask_braze(
    make_client: Callable[[], BrazeClient], rows: list[dict], report: ReleaseReport
) -> tuple[dict, dict]:
    """Braze's users per identity, and the identities whose export failed (with why)."""
    answers: dict[tuple[str, str], list[dict]] = defaultdict(list)
    failures: dict[tuple[str, str], str] = {}
    bodies = _export_bodies(rows)
    window = asyncio.Semaphore(EXPORT_IN_FLIGHT)
    client = make_client()

    async def ask(body: dict, asked: list[tuple[str, str]]) -> None:
        async with window:
            outcome = await client.post(EXPORT_PATH, orjson.dumps(body), retry_ambiguous=True)
        report.export_requests += 1
        users = outcome.body.get("users") if outcome.kind == "answered" else None
        if not isinstance(users, list):
            why = outcome.message or f"{outcome.kind} {outcome.status or ''}".strip()
            failures.update({who: why for who in asked})
            return
        for user in users:
            if isinstance(user, dict):
                for who in _owners(user, asked):
                    answers[who].append(user)

    try:
        async with client:
            await asyncio.gather(*(ask(body, asked) for body, asked in bodies))
    except BrazeAuthError as exc:
        raise BrazeAuthError(
            f"{exc}. Reconcile needs a key with the users.export.ids permission; nothing was changed."
        ) from None
    return answers, failures
