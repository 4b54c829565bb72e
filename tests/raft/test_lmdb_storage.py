"""LmdbStorage: the Storage contract (same behaviour as MemoryStorage), durability,
checksums, file modes and crash recovery."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftmq.raft.lmdb_storage import (
    DB_LOG,
    DB_RAFT,
    KEY_HARD_STATE,
    CorruptLogError,
    LmdbStorage,
    decode_entry,
    encode_entry,
)
from raftmq.raft.storage import (
    CompactedError,
    MemoryStorage,
    SnapshotOutOfDateError,
    StorageError,
    UnavailableError,
)
from raftmq.raft.types import CONF_CHANGE, ConfState, Entry, HardState, Snapshot, SnapshotMeta

SRC = str(Path(__file__).resolve().parents[2] / "src")


def ents(lo: int, hi: int, term: int, size: int = 10) -> list[Entry]:
    """Entries lo..hi (inclusive) of ``term`` with data derived from (index, term)."""
    return [Entry(term, i, f"{i}:{term}:".encode().ljust(size, b"x")) for i in range(lo, hi + 1)]


@pytest.fixture(params=["memory", "lmdb"])
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "memory":
        yield MemoryStorage()
    else:
        s = LmdbStorage(str(tmp_path / "db"))
        yield s
        s.close()


# -- the Storage contract, over both implementations ----------------------------------


def test_empty_storage(storage) -> None:
    assert storage.first_index() == 1
    assert storage.last_index() == 0
    assert storage.term(0) == 0
    with pytest.raises(UnavailableError):
        storage.term(1)
    assert storage.entries(1, 1) == []
    with pytest.raises(UnavailableError):
        storage.entries(1, 2)
    hs, cs = storage.initial_state()
    assert (hs.term, hs.vote, hs.commit) == (0, 0, 0)
    assert cs == ConfState()
    assert storage.snapshot().is_empty()


def test_append_and_read(storage) -> None:
    es = ents(1, 5, 1) + ents(6, 8, 2)
    storage.append(es)
    assert storage.first_index() == 1
    assert storage.last_index() == 8
    assert [storage.term(i) for i in range(0, 9)] == [0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert storage.entries(1, 9) == es
    assert storage.entries(3, 6) == es[2:5]
    with pytest.raises(UnavailableError):
        storage.entries(3, 10)
    with pytest.raises(UnavailableError):
        storage.term(9)


def test_entries_max_bytes_returns_at_least_one(storage) -> None:
    es = ents(1, 10, 1, size=100)  # each counts 124 bytes
    storage.append(es)
    assert storage.entries(1, 11, max_bytes=1) == es[:1]
    assert storage.entries(1, 11, max_bytes=124 * 3) == es[:3]
    assert storage.entries(1, 11, max_bytes=124 * 3 + 123) == es[:3]
    assert storage.entries(1, 11, max_bytes=10**9) == es


def test_conflicting_append_truncates_suffix(storage) -> None:
    """Raft §5.3: an entry that conflicts (same index, different term) and all that follow go."""
    storage.append(ents(1, 5, 1))
    storage.append(ents(3, 4, 2))
    assert storage.last_index() == 4
    assert storage.entries(1, 5) == ents(1, 2, 1) + ents(3, 4, 2)
    with pytest.raises(UnavailableError):
        storage.term(5)
    storage.append(ents(5, 6, 3))
    assert [storage.term(i) for i in range(1, 7)] == [1, 1, 2, 2, 3, 3]


def test_append_with_gap_is_refused(storage) -> None:
    storage.append(ents(1, 3, 1))
    with pytest.raises((AssertionError, StorageError)):
        storage.append(ents(5, 6, 1))
    assert storage.last_index() == 3


def test_compaction(storage) -> None:
    storage.append(ents(1, 10, 1) + ents(11, 12, 2))
    cs = ConfState((1, 2, 3))
    snap = storage.create_snapshot(5, cs, b"state at 5")
    assert snap.meta == SnapshotMeta(5, 1, cs)
    storage.compact(5)
    assert storage.first_index() == 6
    assert storage.last_index() == 12
    assert storage.term(5) == 1  # the compaction point's term stays known (Raft §5.3 check)
    with pytest.raises(CompactedError):
        storage.term(4)
    with pytest.raises(CompactedError):
        storage.entries(5, 7)
    assert storage.entries(6, 13) == ents(6, 10, 1) + ents(11, 12, 2)
    with pytest.raises(CompactedError):
        storage.compact(5)
    with pytest.raises(SnapshotOutOfDateError):
        storage.create_snapshot(4, cs, b"old")
    got = storage.snapshot()
    assert got.meta == SnapshotMeta(5, 1, cs)
    assert got.data == b"state at 5"


def test_append_skips_compacted_entries(storage) -> None:
    storage.append(ents(1, 6, 1))
    storage.create_snapshot(4, ConfState((1,)), b"s")
    storage.compact(4)
    storage.append(ents(2, 8, 1))  # 2..4 are below the compaction point
    assert storage.first_index() == 5
    assert storage.entries(5, 9) == ents(5, 8, 1)


def test_apply_snapshot_replaces_log(storage) -> None:
    storage.append(ents(1, 5, 1))
    snap = Snapshot(SnapshotMeta(20, 3, ConfState((1, 2, 3), (4,))), b"leader state")
    storage.apply_snapshot(snap)
    assert storage.first_index() == 21
    assert storage.last_index() == 20
    assert storage.term(20) == 3
    with pytest.raises(CompactedError):
        storage.entries(5, 6)
    assert storage.snapshot() == snap
    assert storage.initial_state()[1] == ConfState((1, 2, 3), (4,))
    storage.append(ents(21, 22, 3))
    assert storage.entries(21, 23) == ents(21, 22, 3)


def test_hard_state_round_trip(storage) -> None:
    storage.set_hard_state(HardState(7, 2, 0))
    assert storage.initial_state()[0] == HardState(7, 2, 0)
    storage.append(ents(1, 3, 7))
    storage.set_hard_state(HardState(8, 0, 3))
    assert storage.initial_state()[0] == HardState(8, 0, 3)


# -- LMDB only ----------------------------------------------------------------------


def test_everything_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with LmdbStorage(path) as s:
        s.save(HardState(3, 1, 8), ents(1, 10, 2) + [Entry(3, 11, b"cc", CONF_CHANGE)], None)
        s.create_snapshot(4, ConfState((1,)), b"snap")
        s.compact(4)
    with LmdbStorage(path) as s:
        assert s.initial_state() == (HardState(3, 1, 8), ConfState((1,)))
        assert (s.first_index(), s.last_index()) == (5, 11)
        assert s.term(4) == 2 and s.term(11) == 3
        assert s.entries(5, 12) == ents(5, 10, 2) + [Entry(3, 11, b"cc", CONF_CHANGE)]
        assert s.snapshot().data == b"snap"


def test_reads_beyond_the_in_memory_caches(tmp_path: Path) -> None:
    """The tail and term caches are bounded; older entries come from LMDB, also after reopen."""
    path = str(tmp_path / "db")
    n = 40_000
    with LmdbStorage(path, sync=False) as s:
        for lo in range(1, n + 1, 5000):
            s.append(ents(lo, lo + 4999, 1 + lo // 10000, size=4))
        expect = ents(100, 199, 1, size=4)
        assert s.entries(100, 200) == expect
        assert s.term(30_001) == 4
    with LmdbStorage(path) as s:
        assert s.last_index() == n
        assert s.entries(100, 200) == expect
        assert [s.term(i) for i in (1, 10_000, 10_001, 39_999, n)] == [1, 1, 2, 4, 4]
        s.append(ents(n - 5, n - 3, 9))  # truncation right after reopen
        assert s.last_index() == n - 3
        assert s.term(n - 6) == 4 and s.term(n - 5) == 9


def test_save_is_one_ready(tmp_path: Path) -> None:
    """hard state, entries and a truncation in one save (one transaction)."""
    with LmdbStorage(str(tmp_path / "db")) as s:
        s.save(HardState(1, 1, 0), ents(1, 3, 1), None)
        s.save(HardState(2, 2, 2), ents(3, 5, 2), None)
        assert s.initial_state()[0] == HardState(2, 2, 2)
        assert s.entries(1, 6) == ents(1, 2, 1) + ents(3, 5, 2)


def test_entry_row_checksum_covers_index_term_kind_and_data() -> None:
    e = Entry(5, 42, b"payload", 0)
    row = encode_entry(e)
    assert decode_entry(42, row) == e
    with pytest.raises(CorruptLogError):
        decode_entry(43, row)  # a row moved to another index
    for pos in range(len(row)):
        bad = bytearray(row)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptLogError) as info:
            decode_entry(42, bytes(bad))
        assert info.value.index == 42
    with pytest.raises(CorruptLogError):
        decode_entry(42, row[:5])


def _corrupt_raw(path: str, index: int, flip_at: int) -> None:
    env = lmdb.open(path, max_dbs=16)
    try:
        db = env.open_db(DB_LOG)
        with env.begin(write=True) as txn:
            key = index.to_bytes(8, "big")
            row = bytearray(txn.get(key, db=db))
            row[flip_at] ^= 0xFF
            txn.put(key, bytes(row), db=db)
    finally:
        env.close()


def test_corrupt_entry_is_reported_never_returned(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with LmdbStorage(path) as s:
        s.append(ents(1, 10, 1, size=50))
    _corrupt_raw(path, 4, flip_at=20)  # a byte of the data
    with LmdbStorage(path) as s:
        assert s.entries(1, 4) == ents(1, 3, 1, size=50)
        with pytest.raises(CorruptLogError) as info:
            s.entries(1, 11)
        assert info.value.index == 4
        with pytest.raises(CorruptLogError):
            s.entries(4, 5)
        with pytest.raises(CorruptLogError):
            s.term(4)
        assert s.entries(5, 11) == ents(5, 10, 1, size=50)


def test_corrupt_last_entry_detected_at_open(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with LmdbStorage(path) as s:
        s.append(ents(1, 3, 1))
    _corrupt_raw(path, 3, flip_at=5)  # a byte of the term
    with pytest.raises(CorruptLogError) as info:
        LmdbStorage(path)
    assert info.value.index == 3


def test_hole_in_log_detected_at_open(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with LmdbStorage(path) as s:
        s.append(ents(1, 5, 1))
    env = lmdb.open(path, max_dbs=16)
    with env.begin(write=True) as txn:
        txn.delete((3).to_bytes(8, "big"), db=env.open_db(DB_LOG, txn=txn))
    env.close()
    with pytest.raises(CorruptLogError):
        LmdbStorage(path)


def test_corrupt_hard_state_detected_at_open(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with LmdbStorage(path) as s:
        s.set_hard_state(HardState(5, 2, 0))
    env = lmdb.open(path, max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(DB_RAFT, txn=txn)
        row = bytearray(txn.get(KEY_HARD_STATE, db=db))
        row[0] ^= 1  # term 5 -> 4: a vote in an older term would be possible again
        txn.put(KEY_HARD_STATE, bytes(row), db=db)
    env.close()
    with pytest.raises(CorruptLogError) as info:
        LmdbStorage(path)
    assert info.value.index == 0


def test_commit_beyond_the_log_detected_at_open(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with LmdbStorage(path) as s:
        s.save(HardState(1, 1, 5), ents(1, 5, 1), None)
    env = lmdb.open(path, max_dbs=16)
    with env.begin(write=True) as txn:
        txn.delete((5).to_bytes(8, "big"), db=env.open_db(DB_LOG, txn=txn))
    env.close()
    with pytest.raises(CorruptLogError) as info:
        LmdbStorage(path)
    assert info.value.index == 5


def test_compact_everything_then_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with LmdbStorage(path) as s:
        s.append(ents(1, 8, 2))
        s.create_snapshot(8, ConfState((1,)), b"all")
        s.compact(8)
        assert (s.first_index(), s.last_index(), s.term(8)) == (9, 8, 2)
    with LmdbStorage(path) as s:
        assert (s.first_index(), s.last_index(), s.term(8)) == (9, 8, 2)
        assert s.entries(9, 9) == []
        s.append(ents(9, 10, 3))
        assert s.entries(9, 11) == ents(9, 10, 3)


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "db"
    old = os.umask(0o002)
    try:
        with LmdbStorage(str(path)) as s:
            s.append(ents(1, 2, 1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o600


def test_map_grows_when_full(tmp_path: Path) -> None:
    with LmdbStorage(str(tmp_path / "db"), map_size=256 * 1024) as s:
        for lo in range(1, 4001, 500):
            s.append(ents(lo, lo + 499, 1, size=1000))  # 4 MB in a 256 KB map
        assert s.last_index() == 4000
        assert s.entries(3999, 4001) == ents(3999, 4000, 1, size=1000)


def test_reader_slots_of_dead_processes_are_freed(tmp_path: Path) -> None:
    """A kill -9'd reader (a broker worker) would pin old pages forever."""
    path = str(tmp_path / "db")
    with LmdbStorage(path) as s:
        s.append(ents(1, 2, 1))
        code = (
            "import sys, time; from raftmq.state.tables import open_environment; "
            "env = open_environment(sys.argv[1], readonly=True); txn = env.begin(); "
            "print('reading', flush=True); time.sleep(60)"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=SRC),
        )
        try:
            assert proc.stdout.readline().strip() == "reading"
            assert s.env.info()["num_readers"] >= 1
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
        assert s.reader_check() == 1
        assert s.reader_check() == 0


# -- crash recovery: kill -9 a writer at random moments ----------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from raftmq.raft.lmdb_storage import LmdbStorage
    from raftmq.raft.types import Entry, HardState

    def data(i, t):
        return (b"%d:%d:" % (i, t)) * 20

    s = LmdbStorage(sys.argv[1])
    hs, _ = s.initial_state()
    term, commit, last = max(hs.term, 1), hs.commit, s.last_index()
    n = 0
    while True:
        n += 1
        if n % 5 == 0 and last - commit > 10:
            # a new leader overwrites the uncommitted tail (Raft §5.3)
            term += 1
            lo = last - 7
        else:
            lo = last + 1
        hi = lo + 300
        es = [Entry(term, i, data(i, term)) for i in range(lo, hi)]
        commit = max(commit, lo - 5)
        s.save(HardState(term, 1, commit), es, None)
        last = hi - 1
        print(commit, last, term, flush=True)
    """
)


def test_kill_9_at_random_moments_leaves_a_consistent_log(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=SRC)
    committed = 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, env=env, text=True
        )
        try:
            reports = rng.randint(1, 40)
            line = ""
            for _ in range(reports):
                line = proc.stdout.readline()
                assert line, "writer died"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
        reported_commit = int(line.split()[0])
        with LmdbStorage(path) as s:
            hs, _ = s.initial_state()
            last = s.last_index()
            # Everything the writer saw saved is still there, and more at most.
            assert hs.commit >= reported_commit >= committed
            assert hs.commit <= last
            es = s.entries(1, last + 1)  # verifies every checksum
            assert [e.index for e in es] == list(range(1, last + 1))
            terms = [e.term for e in es]
            assert terms == sorted(terms) and terms[-1] <= hs.term
            for e in es:
                assert e.data == (b"%d:%d:" % (e.index, e.term)) * 20
            committed = hs.commit
    assert committed > 0


def test_crc_is_zlib_crc32(tmp_path: Path) -> None:
    """The documented checksum: crc32 over (index, term, kind) little-endian, then data."""
    row = encode_entry(Entry(2, 9, b"abc", 1))
    head = (9).to_bytes(8, "little") + (2).to_bytes(8, "little") + bytes([1])
    assert int.from_bytes(row[:4], "little") == zlib.crc32(b"abc", zlib.crc32(head))


# -- model-based: random histories give the same reads as MemoryStorage --------------------

ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 12), st.integers(1, 40), st.booleans()),
        st.tuples(st.just("compact"), st.floats(0, 1), st.just(0), st.just(False)),
        st.tuples(st.just("install"), st.integers(1, 30), st.just(0), st.just(False)),
        st.tuples(st.just("hard_state"), st.integers(0, 3), st.integers(0, 100), st.just(False)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(False)),
    ),
    max_size=25,
)


def _same_reads(ref: MemoryStorage, s: LmdbStorage) -> None:
    first, last = ref.first_index(), ref.last_index()
    assert (s.first_index(), s.last_index()) == (first, last)
    assert s.initial_state() == ref.initial_state()
    for i in range(first - 1, last + 1):
        assert s.term(i) == ref.term(i)
    assert s.entries(first, last + 1) == ref.entries(first, last + 1)
    for m in (1, 200, 1000):
        assert s.entries(first, last + 1, m) == ref.entries(first, last + 1, m)
    if first > 1:
        with pytest.raises(CompactedError):
            s.term(first - 2)
        with pytest.raises(CompactedError):
            s.entries(first - 1, last + 1)
    with pytest.raises(UnavailableError):
        s.term(last + 1)
    assert s.snapshot() == ref.snapshot()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=ACTIONS)
def test_random_histories_match_memory_storage(tmp_path_factory: pytest.TempPathFactory, actions: list) -> None:
    path = str(tmp_path_factory.mktemp("model") / "db")
    ref = MemoryStorage()
    s = LmdbStorage(path, sync=False)
    term = 1
    try:
        for kind, a, b, flag in actions:
            if kind == "append":
                # start somewhere in the last `a` uncommitted entries (a conflict) or
                # right after the end; committed entries are never replaced (Raft §5.4)
                lo = max(ref.last_index() + 1 - a, ref.hard_state.commit + 1, 1)
                if flag:
                    term += 1
                es = [Entry(term, i, b"%d/%d" % (i, term) * (i % 7)) for i in range(lo, lo + b)]
                ref.append(list(es))
                s.append(list(es))
            elif kind == "compact":
                lo, hi = ref.first_index(), ref.last_index()
                if hi >= lo:
                    i = lo + int(a * (hi - lo))
                    cs = ConfState((1, 2))
                    ref.create_snapshot(i, cs, b"snap%d" % i)
                    s.create_snapshot(i, cs, b"snap%d" % i)
                    ref.compact(i)
                    s.compact(i)
            elif kind == "install":
                index = max(ref.snapshot().meta.index, ref.hard_state.commit) + a
                term += 1
                snap = Snapshot(SnapshotMeta(index, term, ConfState((1, 2, 3))), b"installed")
                ref.apply_snapshot(snap)
                s.save(None, [], snap)
            elif kind == "hard_state":
                hs = HardState(term, a, min(b, ref.last_index()))
                ref.set_hard_state(hs)
                s.set_hard_state(hs)
            else:
                s.close()
                s = LmdbStorage(path, sync=False)
            _same_reads(ref, s)
    finally:
        s.close()
