"""The authorization policy: parsing (bad files are clear ConfigErrors), decisions, reloads."""

from __future__ import annotations

import json

import pytest

from rustic_ai.k8s import ConfigError, HostSettings, NotAuthorizedError
from rustic_ai.k8s.base.authz import Identity, Policy, PolicyFile

POLICY = {"rules": [
    {"identities": ["rustic-engine", "spiffe://cluster.local/ns/rustic-ai/sa/engine-*"],
     "allow": ["launch", "stop", "read"], "modules": ["rustic_ai."]},
    {"identities": ["dashboard"], "allow": ["read"]},
    {"identities": ["team-a"], "allow": ["launch", "read"], "guilds": ["team-a-*"], "modules": ["team_a.agents"]},
]}
ENGINE = Identity("rustic-engine")
MESH = Identity("", ("spiffe://cluster.local/ns/rustic-ai/sa/engine-7",))
TEAM_A = Identity("team-a", ("team-a.svc",))


@pytest.fixture
def policy() -> Policy:
    return Policy.parse(POLICY)


def test_the_engine_may_do_everything_with_rustic_ai_classes(policy):
    for action in ("launch", "stop", "read"):
        policy.check(ENGINE, action, "any-guild", "rustic_ai.agents.Echo")
    policy.check(MESH, "launch", "g", "rustic_ai.core.X")  # matched by its URI SAN alone


@pytest.mark.parametrize("who, action, guild, cls, fragment", [
    (Identity("stranger", ("stranger.svc",)), "read", "g", "",
     "CN=stranger SAN=stranger.svc is not named in this host's authorization policy: read refused"),
    (Identity("dashboard"), "launch", "g", "rustic_ai.X", "CN=dashboard may not launch"),
    (Identity("dashboard"), "stop", "g", "", "CN=dashboard may not stop"),
    (TEAM_A, "launch", "team-b-x", "team_a.agents.A", "may not launch in guild 'team-b-x'"),
    (TEAM_A, "launch", "team-a-1", "rustic_ai.agents.A", "may not launch agent class 'rustic_ai.agents.A'"),
    (ENGINE, "launch", "g", "support.agents.X", "may not launch agent class 'support.agents.X'"),
    (Identity(), "read", "g", "", "client certificate (no names) is not named"),
])
def test_everything_else_is_refused_naming_the_identity(policy, who, action, guild, cls, fragment):
    with pytest.raises(NotAuthorizedError) as info:
        policy.check(who, action, guild, cls)
    assert fragment in str(info.value)


def test_a_rule_s_guild_patterns_and_module_prefixes_allow_what_they_name(policy):
    policy.check(TEAM_A, "launch", "team-a-1", "team_a.agents.sub.A")
    policy.check(TEAM_A, "read", "team-a-2")
    readable = policy.readable_guilds(TEAM_A)
    assert readable("team-a-9") and not readable("team-b-x")
    assert policy.readable_guilds(Identity("dashboard"))("anything")
    with pytest.raises(NotAuthorizedError, match="CN=stranger is not named"):
        policy.readable_guilds(Identity("stranger"))


@pytest.mark.parametrize("data, fragment", [
    ([], 'must be a JSON object {"rules": [...]}'),
    ({"rules": [], "extra": 1}, "and nothing else"),
    ({"rules": ["x"]}, "rules[0] must be an object"),
    ({"rules": [{"allow": ["read"]}]}, "rules[0].identities must be a non-empty list"),
    ({"rules": [{"identities": ["a"], "allow": []}]}, "rules[0].allow must be a non-empty list"),
    ({"rules": [{"identities": ["a"], "allow": ["delete"]}]}, "unknown actions ['delete']"),
    ({"rules": [{"identities": ["a"], "allow": ["read"], "guild": ["x"]}]}, "unknown keys ['guild']"),
    ({"rules": [{"identities": ["a"], "allow": ["read"], "guilds": "x"}]}, "rules[0].guilds must be"),
])
def test_a_bad_policy_is_a_config_error_naming_what_is_wrong(data, fragment):
    with pytest.raises(ConfigError) as info:
        Policy.parse(data, "p.json")
    assert fragment in str(info.value) and str(info.value).startswith("p.json")


def test_an_unreadable_or_garbled_file_is_a_config_error_naming_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE=.*missing.json.*cannot be read"):
        PolicyFile(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{rules")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        PolicyFile(str(bad))


def test_a_changed_file_is_used_after_the_next_check_and_a_broken_one_is_not(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"rules": [{"identities": ["a"], "allow": ["read"]}]}))
    now = [0.0]
    pf = PolicyFile(str(path), check_every_s=1.0, clock=lambda: now[0])
    # A ConfigMap update: a new file swapped in (new inode).
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"rules": [{"identities": ["b"], "allow": ["read"]}]}))
    new.replace(path)
    pf.current().check(Identity("a"), "read", "g")  # not looked at yet: checks are rate-limited
    now[0] = 1.5
    pf.current().check(Identity("b"), "read", "g")
    with pytest.raises(NotAuthorizedError):
        pf.current().check(Identity("a"), "read", "g")
    path.write_text("{half written")
    now[0] = 3.0
    pf.current().check(Identity("b"), "read", "g")  # the policy in force stays
    assert pf.reloads == 1


def test_a_policy_without_tls_refuses_to_start():
    with pytest.raises(ConfigError) as info:
        HostSettings.from_env({"RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE": "/etc/rustic/policy.json"})
    assert "RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE" in str(info.value) and "needs mutual TLS" in str(info.value)
