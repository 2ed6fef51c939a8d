"""Protocol edge: status mapping both ways, pb conversion, and stubs matching the .proto."""

import filecmp
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from rustic_ai.k8s.base import errors as e
from rustic_ai.k8s.base.models import AgentRecord, AgentState, HostRecord, HostState
from rustic_ai.k8s.protocol import convert
from rustic_ai.k8s.protocol.status import CODE_TO_ERROR, code_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "error, code",
    [
        (e.InvalidSpecError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (e.AgentNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (e.AgentAlreadyExistsError("x"), grpc.StatusCode.ALREADY_EXISTS),
        (e.HostFullError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (e.HostUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (e.ForbiddenModuleError("x"), grpc.StatusCode.PERMISSION_DENIED),
        (ValueError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_has_one_status_and_maps_back(error, code):
    assert code_for(error) == code
    if code != grpc.StatusCode.INTERNAL:
        assert isinstance(error, CODE_TO_ERROR[code])


def test_agent_record_round_trips_through_protobuf():
    r = AgentRecord("g", "a", "n", "pkg.C", '{"id": "a"}', "h:1", 42, AgentState.FAILED, 1.5, 2, "why", -9,
                    ["l1", "l2"])
    assert convert.agent_from_pb(convert.agent_to_pb(r)) == r
    r.exit_code = None
    assert convert.agent_from_pb(convert.agent_to_pb(r)).exit_code is None


def test_host_record_round_trips_through_protobuf():
    h = HostRecord("h:1", "n", 10, 3, HostState.DRAINING, "1.0", 2.5)
    assert convert.host_from_pb(convert.host_to_pb(h)) == h


def test_committed_stubs_match_the_proto(tmp_path):
    """Fails when protos/ changed and `scripts/dev protos` was not run."""
    proto = "rustic_ai/k8s/protocol/v1/agent_host.proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto],
        check=True,
    )
    generated = tmp_path / "rustic_ai/k8s/protocol/v1"
    committed = ROOT / "src/rustic_ai/k8s/protocol/v1"
    names = ["agent_host_pb2.py", "agent_host_pb2.pyi", "agent_host_pb2_grpc.py"]
    _match, mismatch, errors = filecmp.cmpfiles(generated, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale stubs {mismatch + errors}: run scripts/dev protos"
