"""Reads pinned to a store revision, from the event window.

Theory of operation
-------------------
The table holds only each device's latest record; the event window
(raftstate/eventwindow.py) holds, per revision, the record before each
change and ``prev_rev``, the revision of that device's previous change. The
state of a device at revision ``R`` is found by walking back from what the
table holds now:

    state, rev = current record, its revision
                 (or None, the delete's revision: a tombstone, for a device
                  deleted within the window)
    while rev > R:
        ev = window.get(rev)          # missing: RevisionCompacted
        state, rev = ev.before, ev.prev_rev

Only events newer than ``R`` are needed, so every ``R`` from
``window.oldest - 1`` to the table's revision is readable; older is
:class:`~raftstate.errors.RevisionCompacted`, newer
:class:`~raftstate.errors.FutureRevision`.

A listing at ``R`` walks the ids the table holds now, merged with the
tombstones (devices deleted since ``R`` no longer in the table), in id
order, with the same paging as a current listing.

Concurrency: the table appends an event before it stores the record it
describes and stores the record before it raises its revision, adds a
tombstone before it removes a deleted record, and removes it only after a
re-created record is stored; so a reader on another thread that checked
``R <= revision`` always finds what it needs, or an event trimmed meanwhile
(RevisionCompacted). Pure functions over the structures passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

from raftstate import devicerecord
from raftstate.errors import FutureRevision, RevisionCompacted
from raftstate.eventwindow import EventWindow
from raftstate.model import DevicePage, DeviceView, OnlineFilter


def check(window: EventWindow, current: int, revision: int) -> None:
    """Raise unless ``revision`` is readable (module docstring)."""
    if revision > current:
        raise FutureRevision(current)
    if revision < window.oldest - 1:
        raise RevisionCompacted(window.oldest, current)


def record_at(
    record: bytes | None, tombstone: int, window: EventWindow, revision: int
) -> bytes | None:
    """A device's record at ``revision`` from its current ``record`` (or,
    deleted, the delete's revision ``tombstone``; 0: none), or ``None`` if it
    did not exist then. Raises ``RevisionCompacted`` if an event it needs is
    gone."""
    state: bytes | None
    if record is not None:
        state, rev = record, devicerecord.revision_of(record)
    elif tombstone:
        state, rev = None, tombstone
    else:
        return None
    while rev > revision:
        ev = window.get(rev)
        if ev is None:
            raise RevisionCompacted(window.oldest, window.latest)
        state, rev = ev.before, ev.prev_rev
    return state


def page(
    ids: Sequence[str],
    recs: dict[str, bytes],
    tombstones: dict[str, int],
    window: EventWindow,
    *,
    prefix: str,
    after: str | None,
    limit: int,
    online: OnlineFilter,
    max_scan: int,
    revision: int,
) -> DevicePage:
    """One page of a listing at ``revision``. ``ids`` is the table's id
    window for the page (at most ``max_scan`` ids from the cursor on)."""
    cursor = prefix if after is None or after < prefix else after
    inclusive = after is None or after < prefix
    truncated = len(ids) == max_scan
    ceiling = ids[-1] if truncated and ids else None
    live = []
    for device_id in ids:
        if not device_id.startswith(prefix):
            truncated, ceiling = False, None
            break
        live.append(device_id)
    dead = [
        d
        for d in list(tombstones)
        if d.startswith(prefix)
        and (d >= cursor if inclusive else d > cursor)
        and (ceiling is None or d <= ceiling)
    ]
    merged = sorted(set(live).union(dead)) if dead else live
    out: list[DeviceView] = []
    last: str | None = None
    for device_id in merged:
        last = device_id
        record = record_at(recs.get(device_id), tombstones.get(device_id, 0), window, revision)
        if record is None:
            continue
        view = devicerecord.view(record)
        if online is OnlineFilter.ONLINE and not view.online:
            continue
        if online is OnlineFilter.OFFLINE and view.online:
            continue
        out.append(view)
        if len(out) == limit:
            break
    more = last is not None and (len(out) == limit or truncated)
    return DevicePage(out, last if more else None)
