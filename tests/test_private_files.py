"""Node state is private: directories 0700 and files 0600 from their first
byte, whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.local import LocalCluster, wait_until
from raftstate.config import NodeConfig
from raftstate.journal import ChecksummedJournal
from raftstate.privfile import open_private, open_private_fd, private_dir, write_private
from raftstate.sdk import DeviceClient


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_file_is_0600_before_its_first_byte(tmp_path: Path, umask0: None) -> None:
    fd = open_private_fd(tmp_path / "f", os.O_WRONLY)
    try:
        assert mode(tmp_path / "f") == 0o600 and os.fstat(fd).st_size == 0
    finally:
        os.close(fd)


def test_an_existing_loose_file_is_tightened_before_it_is_written(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("old")
    os.chmod(tmp_path / "f", 0o644)
    with open_private(tmp_path / "f", "w") as fh:
        assert mode(tmp_path / "f") == 0o600
        fh.write("secret")


def test_write_private_never_exposes_the_secret(
    tmp_path: Path, umask0: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        seen.append(mode(src))  # the temporary, full of the secret, before the rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "cluster.toml"
    target.write_text("loose")
    os.chmod(target, 0o666)
    write_private(target, 'cluster_secret = "x"\n')
    assert seen == [0o600] and mode(target) == 0o600
    assert target.read_text() == 'cluster_secret = "x"\n'
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.toml"]


def test_private_dir_creates_and_tightens_every_level(tmp_path: Path, umask0: None) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(0o777)
    private_dir(loose / "a" / "b")
    private_dir(loose)
    assert [mode(p) for p in (loose, loose / "a", loose / "a" / "b")] == [0o700] * 3


def test_journal_files_are_private_under_umask_0(tmp_path: Path, umask0: None) -> None:
    journal = ChecksummedJournal(str(tmp_path / "raft.journal"))
    assert mode(tmp_path / "raft.journal") == 0o600
    for i in range(1, 5):
        journal.add(b"cmd%d" % i, i, 1)
    journal.deleteEntriesTo(2)  # rewrite through a temporary
    journal.setRaftCommitIndex(3)  # meta file
    for p in tmp_path.iterdir():
        assert mode(p) == 0o600, p
    journal._destroy()


def _tree(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def test_a_cluster_state_dir_is_private_after_writes_and_a_compaction(
    tmp_path: Path, umask0: None
) -> None:
    """Nodes inherit umask 0 here: nothing they write may be more open."""
    state = tmp_path / "state"
    cfg = NodeConfig.for_tests(compaction_min_entries=20)
    with LocalCluster(state, 3, base_config=cfg) as cluster:
        with DeviceClient(cluster.endpoints) as client:
            for i in range(60):
                client.heartbeat(f"perm-{i}", {"i": str(i)})
        wait_until(
            lambda: all((state / n / "snapshot.bin").exists() for n in cluster.nodes),
            30,
            "every node to write a snapshot",
        )
    paths = [state, *_tree(state)]
    assert any(p.name.endswith(".key") for p in paths)
    loose = [
        (str(p.relative_to(tmp_path)), oct(mode(p)))
        for p in paths
        if mode(p) != (0o700 if p.is_dir() else 0o600)
    ]
    assert loose == []
