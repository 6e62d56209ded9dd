"""Checksummed storage: snapshot, journal record and meta codecs; the journal
file; the verifying snapshot receiver; the catch-up gate; the tick guard."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from raftstate.catchup import CatchUpGate
from raftstate.integrity import (
    JOURNAL_MAGIC,
    CorruptData,
    Meta,
    decode_meta,
    encode_meta,
    encode_record,
    open_snapshot,
    scan_records,
    seal_snapshot,
)
from raftstate.journal import (
    ChecksummedJournal,
    JournalFormatError,
    VerifyingSerializer,
    compaction_due,
)
from raftstate.secretcheck import generate_secret
from raftstate.tickguard import TickGuard

SECRET = generate_secret()


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# ---- snapshot codec -----------------------------------------------------------------


def test_snapshot_round_trip() -> None:
    payload = bytes(range(256)) * 3
    assert open_snapshot(seal_snapshot(payload)) == payload
    assert open_snapshot(seal_snapshot(b"")) == b""


def test_every_single_bit_flip_of_a_snapshot_is_detected() -> None:
    sealed = seal_snapshot(b"devices and revisions " * 8)
    for bit in range(len(sealed) * 8):
        with pytest.raises(CorruptData):
            open_snapshot(_flip(sealed, bit))


def test_every_truncation_and_extension_of_a_snapshot_is_detected() -> None:
    sealed = seal_snapshot(b"x" * 100)
    for cut in range(len(sealed)):
        with pytest.raises(CorruptData):
            open_snapshot(sealed[:cut])
    with pytest.raises(CorruptData):
        open_snapshot(sealed + b"\0")


def test_a_bare_protobuf_snapshot_of_the_old_format_is_refused() -> None:
    with pytest.raises(CorruptData, match="magic"):
        open_snapshot(b"\x0a\x05hello" + b"\0" * 60)


# ---- journal records ----------------------------------------------------------------

ENTRIES = [(b"\x01noop", 5, 2), (b"batch-one" * 3, 6, 2), (b"", 7, 3), (b"batch-three", 8, 3)]


def _journal_bytes(entries: list[tuple[bytes, int, int]] = ENTRIES) -> tuple[bytes, list[int]]:
    data = JOURNAL_MAGIC
    bounds = [len(data)]
    for command, index, term in entries:
        data += encode_record(command, index, term)
        bounds.append(len(data))
    return data, bounds


def test_records_round_trip() -> None:
    data, bounds = _journal_bytes()
    scan = scan_records(data, len(JOURNAL_MAGIC))
    assert scan.problem is None
    assert scan.entries == ENTRIES
    assert scan.offsets == bounds[:-1]
    assert scan.end == len(data)


def test_every_single_bit_flip_of_a_record_is_detected_and_the_scan_stops_there() -> None:
    data, bounds = _journal_bytes()
    for bit in range(len(JOURNAL_MAGIC) * 8, len(data) * 8):
        scan = scan_records(_flip(data, bit), len(JOURNAL_MAGIC))
        damaged = max(i for i, b in enumerate(bounds) if b <= bit // 8)
        assert scan.problem is not None, f"bit {bit} not detected"
        assert scan.entries == ENTRIES[:damaged], f"bit {bit}"
        assert scan.end == bounds[damaged]


def test_every_truncation_inside_a_record_is_detected() -> None:
    data, bounds = _journal_bytes()
    for cut in range(len(JOURNAL_MAGIC), len(data)):
        scan = scan_records(data[:cut], len(JOURNAL_MAGIC))
        kept = max(i for i, b in enumerate(bounds) if b <= cut)
        assert scan.entries == ENTRIES[:kept]
        if cut in bounds:  # a cut between records is a shorter valid journal
            assert scan.problem is None
        else:
            assert scan.problem is not None, f"cut at {cut} not detected"


def test_a_record_out_of_sequence_stops_the_scan() -> None:
    data = JOURNAL_MAGIC + encode_record(b"a", 1, 1) + encode_record(b"b", 3, 1)
    scan = scan_records(data, len(JOURNAL_MAGIC))
    assert scan.entries == [(b"a", 1, 1)] and scan.problem is not None


def test_scan_reports_how_far_the_lost_range_goes() -> None:
    data, bounds = _journal_bytes()
    bad = _flip(data, (bounds[1] + 12) * 8)  # the CRC of the second record
    scan = scan_records(bad, len(JOURNAL_MAGIC))
    assert [e[1] for e in scan.entries] == [5]
    assert scan.lost_through == 8


# ---- meta -----------------------------------------------------------------------------


def test_meta_round_trip_every_flip_and_truncation_detected() -> None:
    meta = Meta(term=7, voted_for="127.0.0.1:7101", commit_index=42, catch_up=True)
    raw = encode_meta(meta)
    assert decode_meta(raw) == meta
    assert decode_meta(encode_meta(Meta())) == Meta()
    for bit in range(len(raw) * 8):
        with pytest.raises(CorruptData):
            decode_meta(_flip(raw, bit))
    for cut in range(len(raw)):
        with pytest.raises(CorruptData):
            decode_meta(raw[:cut])


def test_a_pickled_meta_is_never_unpickled() -> None:
    import pickle

    with pytest.raises(CorruptData):
        decode_meta(pickle.dumps({"currentTerm": 3}))


# ---- the journal file -------------------------------------------------------------


def _fill(path: Path, n: int, size: int = 10) -> ChecksummedJournal:
    journal = ChecksummedJournal(str(path))
    for i in range(1, n + 1):
        journal.add(bytes([i % 256]) * size, i, 1)
    journal.setCurrentTerm(3, "peer")
    journal.setRaftCommitIndex(n)
    journal._destroy()
    return journal


def test_journal_survives_reopen_truncation_and_compaction(tmp_path: Path) -> None:
    path = tmp_path / "raft.journal"
    _fill(path, 20)
    journal = ChecksummedJournal(str(path))
    assert len(journal) == 20 and journal[19] == (bytes([20]) * 10, 20, 1)
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (3, "peer")
    assert journal.damage is None and not journal.catch_up
    journal.setRaftCommitIndex(15)
    journal.deleteEntriesFrom(15)  # drop the uncommitted 16..20
    journal.add(b"new", 16, 2)
    journal.deleteEntriesTo(5)  # compaction: keep 6..16
    assert journal.compactions == 1
    journal._destroy()
    journal = ChecksummedJournal(str(path))
    assert [e[1] for e in journal] == list(range(6, 17))
    assert journal[-1] == (b"new", 16, 2)
    assert journal.damage is None
    journal._destroy()


def test_a_corrupt_middle_record_truncates_the_journal_and_sets_catch_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "raft.journal"
    _fill(path, 20)
    raw = bytearray(path.read_bytes())
    raw[len(JOURNAL_MAGIC) + 9 * (8 + 16 + 10) + 20] ^= 0x40  # inside record 10
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR, logger="raftstate.journal"):
        journal = ChecksummedJournal(str(path))
    assert [e[1] for e in journal] == list(range(1, 10))
    assert journal.catch_up and journal.damage is not None
    assert journal.getRaftCommitIndex() == 9
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "entries 10-20 lost" in lines[0], lines
    journal.add(b"again", 10, 4)  # appends continue after the good prefix
    journal._destroy()
    journal = ChecksummedJournal(str(path))
    assert journal[-1] == (b"again", 10, 4) and journal.catch_up
    journal.set_catch_up(False)
    journal._destroy()
    assert not ChecksummedJournal(str(path)).catch_up


def test_a_journal_shorter_than_its_commit_index_sets_catch_up(tmp_path: Path) -> None:
    path = tmp_path / "raft.journal"
    _fill(path, 10)
    data, _ = _journal_bytes([(bytes([i]) * 10, i, 1) for i in range(1, 6)])
    path.write_bytes(data)  # cut on a record boundary: entries 6..10 gone
    journal = ChecksummedJournal(str(path))
    assert len(journal) == 5 and journal.catch_up and journal.getRaftCommitIndex() == 5


def test_a_pysyncobj_format_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "raft.journal"
    path.write_bytes(b"PYSYNCOBJ" + b"\0" * 40)
    with pytest.raises(JournalFormatError, match="pysyncobj's journal format"):
        ChecksummedJournal(str(path))


def test_a_corrupt_meta_file_loses_the_vote_and_sets_catch_up(tmp_path: Path) -> None:
    path = tmp_path / "raft.journal"
    _fill(path, 3)
    meta = tmp_path / "raft.journal.meta"
    meta.write_bytes(_flip(meta.read_bytes(), 100))
    journal = ChecksummedJournal(str(path))
    assert journal.getVotedForNodeId() is None and journal.catch_up
    assert decode_meta(meta.read_bytes()).catch_up  # persisted at once


def test_bytes_before_counts_what_a_compaction_frees(tmp_path: Path) -> None:
    journal = _fill(tmp_path / "j", 0)
    journal = ChecksummedJournal(str(tmp_path / "j"))
    for i in range(1, 11):
        journal.add(b"x" * 100, i, 1)
    record = 8 + 16 + 100
    assert journal.size_bytes == len(JOURNAL_MAGIC) + 10 * record
    assert journal.bytes_before(1) == 0
    assert journal.bytes_before(4) == 3 * record
    assert journal.bytes_before(99) == 10 * record


def test_compaction_is_due_only_over_the_limit_with_enough_to_free() -> None:
    assert not compaction_due(1000, 1000, 1000)
    assert compaction_due(1001, 500, 1000)
    assert not compaction_due(5000, 499, 1000)  # mostly unapplied entries


# ---- snapshot receiver --------------------------------------------------------------


def _verify(path: str) -> None:
    open_snapshot(Path(path).read_bytes())


def _receive(serializer: VerifyingSerializer, data: bytes, piece: int = 7) -> list[bool]:
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    results = [serializer.setTransmissionData((p, i == 0, False)) for i, p in enumerate(pieces)]
    results.append(serializer.setTransmissionData((b"", False, True)))
    return results


def test_a_streamed_snapshot_replaces_ours_only_when_it_verifies(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.bin"
    ours = seal_snapshot(b"our snapshot")
    path.write_bytes(ours)
    serializer = VerifyingSerializer(str(path), 1024, False, None, None, None, verify=_verify)
    theirs = seal_snapshot(b"the leader's snapshot" * 5)
    assert not any(_receive(serializer, _flip(theirs, 200)))
    assert path.read_bytes() == ours and serializer.rejected == 1
    assert not (tmp_path / "snapshot.bin.incoming").exists()
    assert _receive(serializer, theirs)[-1] is True
    assert path.read_bytes() == theirs


# ---- catch-up gate and tick guard ----------------------------------------------------


def test_catch_up_gate_holds_votes_until_the_leaders_commit_index_is_applied() -> None:
    gate = CatchUpGate(active=True, known_committed=30)
    assert not gate.may_vote()
    assert not gate.on_applied(100)  # no leader heard yet: no target
    gate.on_leader_commit(50)
    gate.on_leader_commit(80)  # the first leader's commit index is the target
    assert gate.target == 50
    assert not gate.on_applied(49) and not gate.may_vote()
    assert gate.on_applied(50) and gate.may_vote()
    assert not gate.on_applied(60)  # reported once
    floor = CatchUpGate(active=True, known_committed=70)
    floor.on_leader_commit(50)
    assert floor.target == 70


def test_tick_guard_counts_logs_once_per_kind_and_acts_once_at_the_limit() -> None:
    guard = TickGuard(3, log_interval_s=5.0, failing_window_s=1.0)
    assert not guard.failing(0.0)
    v1 = guard.on_failure("KeyError@x:1", "KeyError: 'type'", 10.0)
    v2 = guard.on_failure("KeyError@x:1", "KeyError: 'type'", 10.1)
    assert v1.log_traceback and not v1.act
    assert not v2.log_traceback and not v2.log_summary
    assert guard.failing(10.1)
    v3 = guard.on_failure("KeyError@x:1", "KeyError: 'type'", 15.2)
    assert v3.log_summary and v3.act and guard.consecutive == 3
    v4 = guard.on_failure("ValueError@y:2", "ValueError: bad", 15.3)
    assert v4.log_traceback and not v4.act  # acts once
    guard.on_success()
    assert guard.consecutive == 0 and guard.total == 4
    assert guard.last_error == "ValueError: bad"
    assert guard.failing(15.9) and not guard.failing(16.4)


# ---- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"compaction_max_journal_bytes": 4 * 128 * 1024 - 1}, "compaction_max_journal_bytes"),
        ({"tick_failure_limit": 0}, "tick_failure_limit"),
    ],
)
def test_integrity_settings_are_validated(change: dict[str, int], field: str) -> None:
    import dataclasses

    from raftstate.config import Member, NodeConfig
    from raftstate.errors import ConfigError

    ok = dataclasses.replace(
        NodeConfig.for_tests(),
        node_id="n1",
        members=(Member("n1", "127.0.0.1:7101", "127.0.0.1:7001"),),
        cluster_secret=SECRET,
    )
    ok.validate()
    with pytest.raises(ConfigError, match=f"^{field}: "):
        dataclasses.replace(ok, **change).validate()


def test_a_corrupt_snapshot_at_start_is_moved_aside_and_the_log_emptied(tmp_path: Path) -> None:
    from raftstate.raftnode import SNAPSHOT_FILE, _quarantine_corrupt_snapshot

    _fill(tmp_path / "raft.journal", 5)
    snapshot = tmp_path / SNAPSHOT_FILE
    snapshot.write_bytes(_flip(seal_snapshot(b"table"), 90))
    journal = ChecksummedJournal(str(tmp_path / "raft.journal"))
    _quarantine_corrupt_snapshot(tmp_path, journal)
    assert not snapshot.exists() and len(list(tmp_path.glob("snapshot.bin.corrupt-*"))) == 1
    assert len(journal) == 0 and journal.catch_up and journal.getRaftCommitIndex() == 1
    assert journal.getCurrentTerm() == 3  # term and vote survive
    journal._destroy()
    journal = ChecksummedJournal(str(tmp_path / "raft.journal"))
    assert len(journal) == 0 and journal.catch_up
