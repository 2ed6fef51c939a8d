from rustic_ai.k8s.base.restart import RestartPolicy, RestartTracker


def test_backoff_doubles_up_to_the_cap_then_intensity_gives_up():
    t = RestartTracker(RestartPolicy(max_restarts=5, window_s=60, backoff_initial_s=1, backoff_max_s=4))
    delays = [t.on_exit(now=float(i), ran_for_s=0.1) for i in range(6)]
    assert delays == [1, 2, 4, 4, 4, None]


def test_restarts_outside_the_window_no_longer_count():
    t = RestartTracker(RestartPolicy(max_restarts=2, window_s=10, backoff_initial_s=1))
    assert t.on_exit(0, 0.1) == 1 and t.on_exit(1, 0.1) == 2
    assert t.on_exit(2, 0.1) is None
    assert t.on_exit(20, 0.1) is not None  # the old ones aged out


def test_a_long_healthy_run_resets_the_backoff():
    t = RestartTracker(RestartPolicy(max_restarts=10, window_s=10, backoff_initial_s=1, backoff_max_s=60))
    t.on_exit(0, 0.1), t.on_exit(1, 0.1), t.on_exit(2, 0.1)
    assert t.on_exit(100, ran_for_s=50) == 1


def test_zero_restarts_means_never():
    assert RestartTracker(RestartPolicy(max_restarts=0)).on_exit(0, 0) is None


def test_policy_comes_from_the_request_then_qos_then_default():
    default = RestartPolicy()
    assert RestartPolicy.for_request({"max_restarts": 1}, {}, default).max_restarts == 1
    assert RestartPolicy.for_request(None, {"qos": {"retry_count": 0}}, default).max_restarts == 0
    assert RestartPolicy.for_request(None, {"qos": {"retry_count": None}}, default) == default
