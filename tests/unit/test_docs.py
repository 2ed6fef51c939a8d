"""The README's configuration reference lists every setting (docs cannot drift from code)."""

from pathlib import Path

import pytest

from rustic_ai.k8s import EngineSettings, HostSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("cls", [HostSettings, EngineSettings])
def test_every_environment_variable_is_in_the_readme(cls):
    missing = [env for env, _, _ in cls.describe() if f"`{env}`" not in README]
    assert missing == [], f"add to README's configuration reference: {missing}"


def test_readme_gives_the_two_commands():
    assert "scripts/dev demo" in README and "scripts/dev test" in README
