import pytest

from rustic_ai.k8s import ConfigError, EngineSettings, HostSettings


def test_defaults_match_the_documented_ones():
    s = HostSettings.from_env({})
    assert (s.agent_ttl_s, s.heartbeat_s, s.capacity) == (60.0, 20.0, 100)


def test_environment_and_overrides():
    s = HostSettings.from_env({"RUSTIC_AGENT_HOST_CAPACITY": "7", "RUSTIC_K8S_REDIS_URL": "redis://r:1/0"},
                              heartbeat_s=2.0)
    assert (s.capacity, s.redis_url, s.heartbeat_s) == (7, "redis://r:1/0", 2.0)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RUSTIC_AGENT_HOST_CAPACITY": "many"}, "RUSTIC_AGENT_HOST_CAPACITY='many' is not a valid int"),
        ({"RUSTIC_AGENT_HOST_CAPACITY": "0"}, "RUSTIC_AGENT_HOST_CAPACITY=0: must be at least 1"),
        ({"RUSTIC_AGENT_HOST_AGENT_TTL_S": "5"}, "RUSTIC_AGENT_HOST_AGENT_TTL_S=5.0: must exceed the heartbeat"),
        ({"RUSTIC_K8S_REDIS_URL": "localhost:6379"}, "RUSTIC_K8S_REDIS_URL='localhost:6379': must be a redis://"),
        ({"RUSTIC_AGENT_HOST_LAUNCH_MODE": "hot"}, "RUSTIC_AGENT_HOST_LAUNCH_MODE='hot'"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError) as info:
        HostSettings.from_env(env)
    assert message in str(info.value)


def test_static_discovery_needs_hosts():
    with pytest.raises(ConfigError, match="RUSTIC_K8S_HOSTS"):
        EngineSettings.from_env({"RUSTIC_K8S_DISCOVERY": "static"})
    s = EngineSettings.from_env({"RUSTIC_K8S_DISCOVERY": "static", "RUSTIC_K8S_HOSTS": "a:1, b:2,"})
    assert s.hosts == ("a:1", "b:2")


def test_every_setting_is_documented():
    for cls in (HostSettings, EngineSettings):
        for env, _default, doc in cls.describe():
            assert env.startswith(("RUSTIC_K8S_", "RUSTIC_AGENT_HOST_")) and doc


def test_a_flag_beats_the_environment_and_a_flag_left_out_does_not_hide_it():
    env = {"RUSTIC_K8S_REDIS_URL": "redis://from-env:1/0", "RUSTIC_K8S_KEY_PREFIX": "env-prefix"}
    # What the CLI passes when --redis-url is given and --key-prefix is not (argparse's None).
    s = EngineSettings.from_env(env, redis_url="redis://from-flag:2/0", key_prefix=None)
    assert (s.redis_url, s.key_prefix) == ("redis://from-flag:2/0", "env-prefix")
    assert EngineSettings.from_env({}, redis_url=None).redis_url == "redis://127.0.0.1:6379/0"
