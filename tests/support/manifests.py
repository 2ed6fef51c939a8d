"""The shipped Kubernetes manifests, rendered and turned into what a pod would see.

`kustomize` runs ``kubectl kustomize`` (offline). `Mounts` plays the kubelet for the
tests: Secrets (from `rustic-k8s certs`' secrets.yaml) and ConfigMaps become files in a
directory per object, and a container's environment is resolved against them — a path
under a mounted volume becomes the file's path here, a secretKeyRef its value — so a
real host or Redis can be started exactly as the manifests configure it.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
OVERLAYS = ROOT / "docker" / "overlays"


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the kustomization (it ships with this machine image)"
    run = subprocess.run([kubectl, "kustomize", str(path)], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(docs: list[dict], kind: str, name: str) -> dict:
    return find(docs, kind, name)["spec"]["template"]["spec"]


def container(docs: list[dict], kind: str, name: str) -> dict:
    [c] = pod_spec(docs, kind, name)["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


class Mounts:
    """A pod's volumes as files under ``root``: <root>/<secret or configmap name>/<key>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data: dict[tuple[str, str], dict[str, bytes]] = {}  # (kind, name) -> key -> bytes

    def add_secrets(self, secrets_yaml: Path) -> "Mounts":
        for doc in yaml.safe_load_all(secrets_yaml.read_text()):
            if doc:
                self._add("Secret", doc["metadata"]["name"],
                          {k: base64.b64decode(v) for k, v in doc.get("data", {}).items()})
        return self

    def add_config_maps(self, docs: list[dict]) -> "Mounts":
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                self._add("ConfigMap", doc["metadata"]["name"], {k: v.encode() for k, v in doc["data"].items()})
        return self

    def _add(self, kind: str, name: str, data: dict[str, bytes]) -> None:
        self.data[(kind, name)] = data
        for key, value in data.items():
            path = self.root / name / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(value)

    def _volume_dir(self, volume: dict) -> Path:
        source = volume.get("secret", {}).get("secretName") or volume.get("configMap", {}).get("name")
        assert source, f"volume {volume['name']} is neither a Secret nor a ConfigMap"
        kind = "Secret" if "secret" in volume else "ConfigMap"
        assert (kind, source) in self.data, f"the pod mounts {kind} {source}, which nothing here provides"
        return self.root / source

    def path(self, pod: dict, c: dict, in_container: str) -> str | None:
        """Where a path inside the container is here, if it lies under a Secret/ConfigMap mount."""
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in c.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            volume = volumes[mount["name"]]
            if in_container.startswith(prefix) and ("secret" in volume or "configMap" in volume):
                rel = in_container[len(prefix):]
                items = (volume.get("secret") or volume.get("configMap")).get("items")
                if items:  # only the listed keys are there, at their paths
                    [key] = [i["key"] for i in items if i["path"] == rel]
                    rel = key
                return str(self._volume_dir(volume) / rel)
        return None

    def env(self, pod: dict, c: dict) -> dict[str, str]:
        """The container's environment: literal values (paths mapped to here) and secretKeyRefs."""
        out = {}
        for name, e in env_of(c).items():
            if "value" in e:
                value = e["value"]
                out[name] = (self.path(pod, c, value) or value) if value.startswith("/") else value
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                out[name] = self.data[("Secret", ref["name"])][ref["key"]].decode()
        return out

    def args(self, pod: dict, c: dict) -> list[str]:
        return [(self.path(pod, c, a) or a) if a.startswith("/") else a for a in c.get("args", [])]
