"""docker/compose.yml as a real compose implementation (Debian's docker-compose) reads it, and every
option its commands pass exists in the installed Flower and launchers.

docker-compose comes from the system (scripts/install-system-packages.sh); nothing is installed here.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
pytestmark = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                reason="docker-compose not installed (scripts/install-system-packages.sh)")
CLIENTS = ("1", "2")


def _config(tmp_path: Path, *files: str, **env: str) -> dict:
    """``docker-compose config``: the merged, interpolated file as the engine would get it."""
    variables = {"MODEL_CACHE": str(tmp_path / "models"), "RUN_CONFIG": str(tmp_path / "run.toml"),
                 **{f"CLIENT{c}_DATA": str(tmp_path / f"client-{c}") for c in CLIENTS}, **env}
    command = ["docker-compose", "--project-directory", str(DOCKER)]
    for name in files:
        command += ["-f", str(DOCKER / name)]
    result = subprocess.run([*command, "config"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **variables})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _mounts(service: dict) -> dict[str, str]:
    """container path -> "source[:ro]" (named volumes by name, binds by host path)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = source + (":ro" if mode == ["ro"] else "")
        else:
            mounts[volume["target"]] = volume["source"] + (":ro" if volume.get("read_only") else "")
    return mounts


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else command


def test_compose_federation_layout(tmp_path: Path) -> None:
    services = _config(tmp_path, "compose.yml")["services"]
    assert set(services) == {"certs", "superlink", "serverapp", "control",
                             *(f"{role}-{c}" for role in ("supernode", "clientapp") for c in CLIENTS)}
    superlink = _command(services["superlink"])
    assert "--certs" in superlink and "--insecure" not in superlink and "--no-auth" not in superlink
    assert superlink[superlink.index("--isolation") + 1] == "process"
    assert "--root-certificates" in _command(services["serverapp"])
    assert "deploy" not in services["serverapp"]  # the GPU is the override's business
    assert _mounts(services["serverapp"])["/models/hf"] == f"{tmp_path / 'models'}:ro"
    outputs = set()
    for c in CLIENTS:
        node, app = services[f"supernode-{c}"], services[f"clientapp-{c}"]
        command = _command(node)
        assert command[command.index("--auth-key") + 1] == f"/certs/supernodes/client-{c}.key"
        assert "--root-certificates" in command and "--insecure" not in command
        for service in (node, app):  # own data, read-only; shared read-only model cache
            assert _mounts(service)["/data"] == f"{tmp_path / f'client-{c}'}:ro"
            assert _mounts(service)["/models/hf"].endswith(":ro")
        outputs.add(_mounts(node)["/output"])
        # the ClientApp executor talks to its own SuperNode's Runtime API port
        port = command[command.index("--port") + 1]
        assert _command(app)[-1] == f"supernode-{c}:{port}"
    assert len(outputs) == len(CLIENTS)
    # nothing that reads /certs starts before the one-shot certs service has written them
    for name, service in services.items():
        if name != "certs" and "/certs" in _mounts(service):
            assert service["depends_on"]["certs"]["condition"] == "service_completed_successfully", name


def test_gpu_override_reserves_a_gpu_for_the_serverapp_only(tmp_path: Path) -> None:
    services = _config(tmp_path, "compose.yml", "compose.gpu.yml")["services"]
    devices = services["serverapp"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert [name for name, service in services.items() if "deploy" in service] == ["serverapp"]


def test_local_override_builds_from_a_local_base_and_uses_host_networking(tmp_path: Path) -> None:
    env = {"BASE_IMAGE": "oscar-local-base", "PIP_FIND_LINKS": "http://127.0.0.1:28480/",
           "SUPERLINK_HOST": "127.0.0.1", "BIND_HOST": "127.0.0.1", "CLIENT1_HOST": "127.0.0.1",
           "CLIENT2_HOST": "127.0.0.1", "SUPERLINK_PORT": "18000"}
    services = _config(tmp_path, "compose.yml", "compose.local.yml", **env)["services"]
    assert {s["network_mode"] for s in services.values()} == {"host"}
    for service in services.values():  # the Dockerfile's own steps, with the base and the wheels of this machine
        assert service["build"]["dockerfile"] == "docker/Dockerfile" and service["build"]["network"] == "host"
        assert service["build"]["args"]["BASE_IMAGE"] == "oscar-local-base"
        assert service["build"]["args"]["PIP_FIND_LINKS"] == env["PIP_FIND_LINKS"]
    assert "--superlink 127.0.0.1:18000" in " ".join(_command(services["supernode-1"]))
    assert all(mount.startswith(("certs", str(tmp_path), "client-", "runs", "superlink-state"))
               for service in services.values() for mount in _mounts(service).values())  # no checkout, no venv


def test_client_override_takes_the_certs_from_a_folder(tmp_path: Path) -> None:
    """A client's machine: its SuperNode reads ca.crt and its key from CERTS_DIR, not the server's volume."""
    services = _config(tmp_path, "compose.yml", "compose.client.yml", CERTS_DIR=str(tmp_path / "certs"))["services"]
    base = _config(tmp_path, "compose.yml")["services"]
    for c in CLIENTS:
        mounts = _mounts(services[f"supernode-{c}"])
        assert mounts["/certs"] == f"{tmp_path / 'certs'}:ro"
        assert {k: v for k, v in mounts.items() if k != "/certs"} == \
            {k: v for k, v in _mounts(base[f"supernode-{c}"]).items() if k != "/certs"}


@cache
def _help(program: tuple[str, ...]) -> str:
    return subprocess.run([*program, "--help"], capture_output=True, text=True, timeout=120).stdout


def test_every_option_exists_in_the_installed_programs(tmp_path: Path) -> None:
    """A Flower upgrade that renames a flag, or a launcher change, breaks this before it breaks a deployment."""
    bin_dir = Path(sys.executable).parent
    for name, service in _config(tmp_path, "compose.yml")["services"].items():
        command = _command(service)
        if command[0] == "sh":
            continue
        if command[:2] == ["python", "-m"]:
            program = (sys.executable, *command[1:4 if command[2] == "oscar_deploy.launch" else 3])
        else:
            program = (str(bin_dir / command[0]),)
        options = [token.split("=")[0] for token in command if token.startswith("--")]
        assert options, name
        text = _help(program)
        assert all(option in text for option in options), (name, [o for o in options if o not in text])
