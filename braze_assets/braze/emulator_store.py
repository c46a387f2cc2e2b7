"""What the local Braze emulator accepted: profiles, events, purchases, deletions and catalogs, and
what ``/users/export/ids`` answers from them."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from itertools import count
from typing import Any

import orjson

from braze_assets.braze.emulator_catalogs import Catalog
from braze_assets.braze.emulator_validation import (
    CONTROL_KEYS,
    STANDARD_ATTRIBUTES,
    DeleteId,
    ExportRequest,
    Identity,
    apply_attribute,
    creates_profile,
    format_time,
    identity_key,
    parse_time,
)

#: export field -> track array whose objects it aggregates, and the object key naming the aggregate
_ACTIVITY = {"custom_events": ("events", "name"), "purchases": ("purchases", "product_id")}


class EmulatorStore:
    """What the emulator accepted, guarded by one lock so tests may read it from any thread.

    Profiles get a generated ``braze_id`` (every Braze profile has one). Email/phone lookups pick the most
    recently updated profile with an external_id, else the most recently updated one (B1.3). Events and
    purchases are stored once each, whether or not a profile exists (Braze never de-duplicates them, B1.1);
    a purchase with quantity N is one stored object. Each profile also keeps, per event name and per
    product_id, the ``first`` and ``last`` time and the ``count`` that ``/users/export/ids`` reports; a
    deleted profile takes them with it. In ``lean`` mode only counters are kept and ``profiles`` in
    :meth:`stats` counts distinct identities seen.

    Catalogs (B2a) keep their schema and their items by id. ``catalogs`` are the ones that exist from the
    start: :meth:`reset` brings them back empty and forgets those created since (lean mode keeps schemas
    but no items).
    """

    def __init__(self, lean: bool = False, catalogs: Iterable[Catalog] = ()):
        self.lean = lean
        self._initial_catalogs = tuple(catalogs)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._profiles: dict[str, dict] = {}  # braze_id -> {"braze_id", ids..., "attributes", "_updated"}
            self._index: dict[str, set[str]] = {}  # identity_key -> braze_ids
            self._events: list[dict] = []
            self._purchases: list[dict] = []
            self._deletions: list[dict] = []
            # braze_id -> export field -> name -> [first, last, count]
            self._activity: dict[str, dict[str, dict[str, list]]] = {}
            self._identities: set[str] = set()  # lean mode only
            self._catalogs = {catalog.name: catalog.fresh() for catalog in self._initial_catalogs}
            self._counts: Counter[str] = Counter()
            self._by_status: Counter[str] = Counter()
            self._clock = count(1)  # orders updates, for "most recently updated"
            self._braze_ids = count(1)

    # --- reading -----------------------------------------------------------------------------------
    def profiles(self) -> list[dict]:
        """Each profile's identifiers (``braze_id`` always; ``email``/``phone`` mirror the attributes)."""
        with self._lock:
            result = []
            for profile in self._profiles.values():
                public = {key: value for key, value in profile.items() if key != "_updated"}
                public["attributes"] = dict(profile["attributes"])
                public.update({k: v for k, v in profile["attributes"].items() if k in ("email", "phone")})
                result.append(public)
            return result

    def events(self) -> list[dict]:
        with self._lock:
            return list(self._events)

    def purchases(self) -> list[dict]:
        with self._lock:
            return list(self._purchases)

    def deletions(self) -> list[dict]:
        with self._lock:
            return list(self._deletions)

    def catalogs(self) -> list[dict]:
        """Every catalog as ``GET /catalogs`` lists it: schema, ``num_items``, ``updated_at``."""
        with self._lock:
            return [catalog.public() for catalog in self._catalogs.values()]

    def catalog_fields(self, name: str) -> dict[str, str] | None:
        """A catalog's schema (field name -> type, ``id`` first), or None if there is no such catalog."""
        with self._lock:
            catalog = self._catalogs.get(name)
            return None if catalog is None else dict(catalog.fields)

    def catalog_items(self, name: str) -> dict[str, dict]:
        """A catalog's items by id, each as last sent (``id`` included); ``KeyError`` if it does not exist."""
        with self._lock:
            return {item_id: dict(item) for item_id, item in self._catalogs[name].items.items()}

    def stats(self) -> dict:
        """Counters; ``by_status`` keys are HTTP statuses, plus ``dropped`` and ``timeout`` for faults
        that leave the client without an answer. ``catalog_requests`` counts every request to the catalog
        item endpoints, whatever its answer; ``catalog_requests_invalid`` those refused with errors;
        ``catalog_items_upserted``/``_deleted`` the items of the accepted ones."""
        with self._lock:
            counts = self._counts
            return {
                "requests": counts["requests"],
                "by_status": dict(self._by_status),
                "profiles": len(self._identities) if self.lean else len(self._profiles),
                **{name: counts[name] for name in ("events", "purchases", "deletions")},
                "track_objects_accepted": counts["track_objects_accepted"],
                "track_objects_rejected": counts["track_objects_rejected"],
                "catalogs": len(self._catalogs),
                "catalog_items": sum(len(catalog.items) for catalog in self._catalogs.values()),
                **{
                    name: counts[name]
                    for name in (
                        "catalog_requests",
                        "catalog_requests_invalid",
                        "catalog_items_upserted",
                        "catalog_items_deleted",
                    )
                },
            }

    def dump(self) -> bytes:
        """Everything stored and counted, as JSON (see :meth:`load`)."""
        with self._lock:
            return orjson.dumps(
                {
                    "profiles": list(self._profiles.values()),
                    **{name: getattr(self, f"_{name}") for name in ("events", "purchases", "deletions")},
                    "activity": {
                        braze_id: {
                            field: {
                                name: [format_time(first), format_time(last), n]
                                for name, (first, last, n) in named.items()
                            }
                            for field, named in fields.items()
                        }
                        for braze_id, fields in self._activity.items()
                    },
                    "identities": sorted(self._identities),
                    "catalogs": [catalog.dump() for catalog in self._catalogs.values()],
                    "counts": self._counts,
                    "by_status": self._by_status,
                }
            )

    def load(self, snapshot: bytes) -> None:
        """Replace the contents with a :meth:`dump`."""
        data = orjson.loads(snapshot)
        self.reset()
        with self._lock:
            for profile in data["profiles"]:
                self._profiles[profile["braze_id"]] = profile
                self._index_profile(profile, add=True)
            self._events, self._purchases, self._deletions = (
                data["events"],
                data["purchases"],
                data["deletions"],
            )
            self._activity = {  # absent from snapshots written before the export endpoint
                braze_id: {
                    field: {
                        name: [parse_time(first), parse_time(last), n]
                        for name, (first, last, n) in named.items()
                    }
                    for field, named in fields.items()
                }
                for braze_id, fields in data.get("activity", {}).items()
            }
            self._identities = set(data["identities"])
            for saved in data.get("catalogs", ()):  # absent from snapshots written before catalogs
                catalog = Catalog.load(saved)
                self._catalogs[catalog.name] = catalog
            self._counts.update(data["counts"])
            self._by_status.update(data["by_status"])
            self._clock = count(max((p["_updated"] for p in data["profiles"]), default=0) + 1)
            self._braze_ids = count(max((int(braze_id, 16) for braze_id in self._profiles), default=0) + 1)

    # --- writing (called by the server) ------------------------------------------------------------
    def record_request(self, outcome: str) -> None:
        with self._lock:
            self._counts["requests"] += 1
            self._by_status[outcome] += 1

    def record_catalog_request(self) -> None:
        """One request to a catalog item endpoint, whatever becomes of it."""
        with self._lock:
            self._counts["catalog_requests"] += 1

    def record_catalog_refusal(self) -> None:
        """One catalog item request refused with ``errors`` (nothing of it is stored)."""
        with self._lock:
            self._counts["catalog_requests_invalid"] += 1

    def create_catalog(self, catalog: Catalog) -> dict | None:
        """``POST /catalogs``: add a catalog and return it as listed; None if the name is taken."""
        with self._lock:
            if catalog.name in self._catalogs:
                return None
            self._catalogs[catalog.name] = catalog
            return catalog.public()

    def record_catalog_items(self, name: str, method: str, items: list[dict]) -> bool:
        """Apply a checked ``PUT`` (replace or create) or ``DELETE`` of items; False if the catalog does
        not exist. Lean mode counts them only."""
        with self._lock:
            catalog = self._catalogs.get(name)
            if catalog is None:
                return False
            counter = "catalog_items_upserted" if method == "PUT" else "catalog_items_deleted"
            self._counts[counter] += len(items)
            if not self.lean:
                catalog.apply(method, items)
            return True

    def record_track(self, accepted: list[tuple[str, dict, Identity]], rejected: int) -> None:
        """Apply the valid objects of one /users/track request, in array order (B1.2); lean: count only."""
        with self._lock:
            counts = self._counts
            counts["track_objects_accepted"] += len(accepted)
            counts["track_objects_rejected"] += rejected
            counts.update(array for array, _obj, _identity in accepted if array != "attributes")
            if self.lean:
                self._identities.update(identity.key for _array, _obj, identity in accepted)
                return
            for array, obj, identity in accepted:
                profile = self._find(*identity)
                if profile is None and creates_profile(array, identity, obj):
                    profile = self._create(identity)
                if array == "attributes":
                    if profile is not None:
                        self._merge(profile, obj)
                else:
                    (self._events if array == "events" else self._purchases).append(
                        {**obj, "_identity": identity.key}
                    )
                    if profile is not None:
                        profile["_updated"] = next(self._clock)
                        self._record_activity(profile["braze_id"], array, obj)

    def record_deletions(self, ids: list[DeleteId]) -> None:
        """B2: remove matching profiles (events and purchases stay) and record every id queued."""
        with self._lock:
            self._counts["deletions"] += len(ids)
            if self.lean:
                return
            for delete in ids:
                self._deletions.append({"type": delete.type, "id": delete.id})
                if delete.type in ("email", "phone"):
                    profile = self._prioritized(delete)
                else:
                    value = tuple(delete.id.values()) if delete.type == "user_alias" else delete.id
                    profile = self._find(delete.type, value, identity_key(delete.type, value))
                if profile is not None:
                    self._index_profile(profile, add=False)
                    del self._profiles[profile["braze_id"]]
                    self._activity.pop(profile["braze_id"], None)

    def export(self, request: ExportRequest) -> tuple[list[dict], list[str]]:
        """``/users/export/ids``: the users found, each with the requested fields it has, and the
        requested ids that match nobody (``invalid_user_ids``). Email and phone may match several users."""
        with self._lock:
            found: list[dict] = []
            invalid: list[str] = []
            lookups: list[tuple[str, list[dict]]] = []
            for external_id in request.external_ids:
                profile = self._find("external_id", external_id, identity_key("external_id", external_id))
                lookups.append((external_id, [profile] if profile else []))
            for alias in request.user_aliases:
                profile = self._find("user_alias", alias, identity_key("user_alias", alias))
                lookups.append((f"{alias[0]}:{alias[1]}", [profile] if profile else []))
            if request.braze_id is not None:
                profile = self._profiles.get(request.braze_id)
                lookups.append((request.braze_id, [profile] if profile else []))
            for kind, value in (("email", request.email), ("phone", request.phone)):
                if value is not None:
                    lookups.append((value, self._candidates(identity_key(kind, value))))
            if request.device_id is not None:
                lookups.append((request.device_id, []))  # the emulator keeps no devices
            for requested, profiles in lookups:
                if not profiles:
                    invalid.append(requested)
                for profile in profiles:
                    if all(profile is not other for other in found):
                        found.append(profile)
            return [self._exported(profile, request.fields) for profile in found], invalid

    # --- internals (lock held) ---------------------------------------------------------------------
    def _record_activity(self, braze_id: str, array: str, obj: dict) -> None:
        field = "custom_events" if array == "events" else "purchases"
        name = obj[_ACTIVITY[field][1]]
        when = parse_time(obj["time"])
        named = self._activity.setdefault(braze_id, {}).setdefault(field, {})
        seen = named.get(name)
        if seen is None:
            named[name] = [when, when, 1]
        else:
            seen[0], seen[1], seen[2] = min(seen[0], when), max(seen[1], when), seen[2] + 1

    def _exported(self, profile: dict, fields: frozenset[str] | None) -> dict:
        """One user of an export answer: the requested fields it has (``None``: every field)."""
        attributes = profile["attributes"]
        user: dict[str, Any] = {}
        candidates: dict[str, Any] = {
            "external_id": profile.get("external_id"),
            "user_aliases": [dict(profile["user_alias"])] if "user_alias" in profile else None,
            "braze_id": profile["braze_id"],
            "custom_attributes": {k: v for k, v in attributes.items() if k not in STANDARD_ATTRIBUTES}
            or None,
            **{name: attributes.get(name) for name in STANDARD_ATTRIBUTES},
        }
        activity = self._activity.get(profile["braze_id"], {})
        for field in _ACTIVITY:
            named = activity.get(field)
            candidates[field] = (
                [
                    {"name": name, "first": format_time(first), "last": format_time(last), "count": count}
                    for name, (first, last, count) in sorted(named.items())
                ]
                if named
                else None
            )
        for field, value in candidates.items():
            if value is not None and (fields is None or field in fields):
                user[field] = value
        return user

    def _candidates(self, key: str) -> list[dict]:
        return [self._profiles[braze_id] for braze_id in self._index.get(key, ())]

    def _find(self, id_type: str, value: Any, key: str) -> dict | None:
        if id_type == "braze_id":
            return self._profiles.get(value)
        braze_ids = self._index.get(key)
        if not braze_ids:
            return None
        if len(braze_ids) == 1:  # always so for external_id and user_alias
            return self._profiles[next(iter(braze_ids))]
        matches = (self._profiles[braze_id] for braze_id in braze_ids)
        return max(matches, key=lambda p: ("external_id" in p, p["_updated"]))

    def _prioritized(self, delete: DeleteId) -> dict | None:
        """Email/phone deletes: narrow the matches by each ``prioritization`` rule in order (a rule that
        would leave nobody is skipped); delete only if exactly one profile remains (B2)."""
        candidates = self._candidates(identity_key(delete.type, delete.id))
        for rule in delete.prioritization:
            if rule == "most_recently_updated":
                narrowed = [max(candidates, key=lambda p: p["_updated"])] if candidates else []
            else:
                narrowed = [p for p in candidates if ("external_id" in p) == (rule == "identified")]
            candidates = narrowed or candidates
        return candidates[0] if len(candidates) == 1 else None

    def _index_profile(self, profile: dict, add: bool) -> None:
        keys = [
            identity_key(name, profile["attributes"][name])
            for name in ("email", "phone")
            if name in profile["attributes"]
        ]
        if "external_id" in profile:
            keys.append(identity_key("external_id", profile["external_id"]))
        if "user_alias" in profile:
            keys.append(identity_key("user_alias", tuple(profile["user_alias"].values())))
        for key in keys:
            if add:
                self._index.setdefault(key, set()).add(profile["braze_id"])
            else:
                self._index[key].discard(profile["braze_id"])

    def _create(self, identity: Identity) -> dict:
        """A new profile; email/phone identities make an email-only/phone-only profile (B1.3)."""
        braze_id = f"{next(self._braze_ids):024x}"
        profile: dict[str, Any] = {"braze_id": braze_id, "attributes": {}, "_updated": next(self._clock)}
        if identity.type == "user_alias":
            profile["user_alias"] = {"alias_name": identity.value[0], "alias_label": identity.value[1]}
        elif identity.type == "external_id":
            profile["external_id"] = identity.value
        else:
            profile["attributes"][identity.type] = identity.value
        self._profiles[braze_id] = profile
        self._index_profile(profile, add=True)
        return profile

    def _merge(self, profile: dict, obj: dict) -> None:
        reindex = "email" in obj or "phone" in obj
        if reindex:
            self._index_profile(profile, add=False)
        merge_objects = obj.get("_merge_objects") is True
        for key, value in obj.items():
            if key not in CONTROL_KEYS:
                apply_attribute(profile["attributes"], key, value, merge_objects)
        if reindex:
            self._index_profile(profile, add=True)
        profile["_updated"] = next(self._clock)
