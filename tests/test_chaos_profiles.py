"""chaos/profiles.toml and its loader: the shipped profiles and the rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.profiles import ProfileError, load_profile, load_profiles


def test_shipped_profiles_have_the_documented_shape() -> None:
    profiles = load_profiles()
    assert set(profiles) == {"lan", "wan", "weak", "bad", "flaky", "partition"}
    assert profiles["wan"].node_rtt_ms == 40
    weak = {t.type: t.attribute_map() for t in profiles["weak"].node}
    assert weak["latency"] == {"latency": 30, "jitter": 10}
    assert weak["packet_loss"]["loss_rate"] == 0.03 and "reorder" in weak
    bad = {t.type: t.attribute_map() for t in profiles["bad"].node}
    assert bad["packet_loss"]["loss_rate"] == 0.10 and "duplicate" in bad
    for profile in profiles.values():
        assert {t.type for t in profile.device} <= {"latency"}
    assert profiles["partition"].schedule[0].isolate == "leader"
    assert len(profiles["flaky"].schedule) >= 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "[p.device.packet_loss]\nloss_rate = 0.1\n[p.node]\n",
            "p.device.packet_loss: unknown toxic",
        ),
        (
            "[p.device]\n[p.node.packet_loss]\nloss_rate = 3\n",
            "p.node.packet_loss.loss_rate: is a fraction",
        ),
        ("[p.device]\n[p.node.latency]\nlag = 3\n", "p.node.latency.lag: unknown attribute"),
        (
            "[p.device]\n[p.node.latency]\nlatency = -1\n",
            "p.node.latency.latency: must be a non-negative",
        ),
        ("[p.device]\n", "p.node: required"),
        (
            '[p.device]\n[p.node]\n[[p.schedule]]\nat_s = 0\nduration_s = 2\nisolate = "leader"\n'
            '[[p.schedule]]\nat_s = 1\nduration_s = 1\nisolate = "n2"\n',
            "p.schedule: outage at 1.0s starts before the previous ends",
        ),
        (
            '[p.device]\n[p.node]\n[[p.schedule]]\nat_s = 0\nduration_s = 2\nisolate = "any one"\n',
            "p.schedule[0].isolate",
        ),
    ],
)
def test_bad_profiles_are_rejected_naming_where(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(body)
    with pytest.raises(ProfileError) as exc:
        load_profiles(path)
    assert str(exc.value).startswith(message)


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="nope: no such profile; known: bad, flaky"):
        load_profile("nope")
