"""Deployment without processes: certificates and keys, and the launchers' input checks."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from oscar_deploy import certs, launch


# ---------------------------------------------------------------------------------------------- certificates
def test_certificates_and_supernode_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert certs.main(["--out", str(tmp_path), "--server-name", "link.example", "--ip", "10.213.77.1",
                       "--supernode", "a"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / certs.CA_CERT).read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / certs.SERVER_CERT).read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.213.77.1", "127.0.0.1", "::1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.example", "localhost"}
    # Flower's own loaders and its curve check accept the SuperNode key pair.
    private = load_ssh_private_key((tmp_path / "supernodes" / "a.key").read_bytes(), password=None)
    public = load_ssh_public_key((tmp_path / "supernodes" / "a.pub").read_bytes())
    assert private.curve.name == "secp384r1" and uses_nist_ec_curve(public)
    assert private.public_key().public_numbers() == public.public_numbers()
    # it says what it wrote and what to do next
    printed = capsys.readouterr().out
    assert "supernodes/a.key  (SuperNode private key: copy to that client only)" in printed
    assert "flwr supernode register" in printed and "oscar-supernode --superlink" in printed
    # never overwrite an existing server certificate
    assert certs.main(["--out", str(tmp_path), "--ip", "10.213.77.2"]) == 1


# ---------------------------------------------------------------------------------------------- launcher checks
def _supernode_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oscar_deploy.launch", "supernode", *args],
                          capture_output=True, text=True, timeout=60, cwd=Path(launch.__file__).parents[1])


def test_supernode_refuses_a_wrong_address_or_missing_certificate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bad_address = _supernode_cli("--superlink", "10.213.77.1", "--insecure", "--data-dir", str(data))
    assert bad_address.returncode == 2 and "is not HOST:PORT" in bad_address.stderr
    missing = _supernode_cli("--superlink", "10.213.77.1:8000", "--root-certificates", str(tmp_path / "ca.crt"),
                             "--no-auth", "--data-dir", str(data))
    assert missing.returncode == 2 and "ca.crt' does not exist" in missing.stderr
    neither = _supernode_cli("--superlink", "10.213.77.1:8000", "--data-dir", str(data))
    assert neither.returncode == 2 and "--root-certificates" in neither.stderr
    certs.make_ca(tmp_path)
    keyless = _supernode_cli("--superlink", "10.213.77.1:8000", "--root-certificates", str(tmp_path / "ca.crt"),
                             "--data-dir", str(data))
    assert keyless.returncode == 2 and "no --auth-key: the SuperLink accepts only registered SuperNodes" in keyless.stderr


def test_supernode_detects_a_certificate_for_another_address(tmp_path: Path) -> None:
    """A TLS server on 127.0.0.2 (loopback) whose certificate lists link.example and 127.0.0.1 only."""
    certs.make_all(tmp_path, ["link.example"], [], [])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / certs.SERVER_CERT, tmp_path / certs.SERVER_KEY)
    with socket.create_server(("127.0.0.2", 0)) as server:
        def serve() -> None:
            conn, _ = server.accept()
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()  # the client rejected our certificate

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with pytest.raises(launch.LaunchError, match="does not accept for '127.0.0.2'"):
            launch.wait_for_superlink("127.0.0.2", server.getsockname()[1], tmp_path / certs.CA_CERT, timeout=5)
        thread.join(timeout=5)


def test_superlink_without_tls_material_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(launch.LaunchError, match="server certificate '.*server.crt' does not exist"):
        certs.make_ca(tmp_path)
        launch.superlink_command(tmp_path, "0.0.0.0", launch.SUPERLINK_PORT, auth=True,
                                 database=tmp_path / "superlink.db", isolation="subprocess")


def _reserve(host: str, port: int, times: int) -> list[int]:
    """``reserve_local_port`` called ``times`` in one short-lived process, which keeps every port it
    reserved until it exits, as a launcher does until its flower-supernode exits."""
    code = (f"from oscar_deploy.launch import reserve_local_port as r; "
            f"print(*[r({host!r}, {port}) for _ in range({times})])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(launch.__file__).parents[1]).stdout
    return [int(p) for p in out.splitlines()[-1].split()]  # after the launcher's "port ... is taken" lines


def test_a_second_supernode_on_one_host_gets_the_next_free_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert _reserve("127.0.0.1", port, 1)[0] > port


def test_a_reserved_port_is_passed_by_before_anyone_binds_it() -> None:
    """What two launchers started at once do (tests/e2e/test_supernode_ports.py runs them): the first
    reservation holds its port although nothing listens there yet, so the second takes the next one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    first, second = _reserve("127.0.0.2", port, 2)
    assert first == port and second > port


def test_connections_are_added_to_an_existing_flower_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Appending a second [superlink] table broke ~/.flwr/config.toml; oscar-connection merges through Flower."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    certs.make_ca(tmp_path / "certs")
    ca = tmp_path / "certs" / certs.CA_CERT
    assert launch.connection_main(["oscar", "--address", "10.213.77.1:8000", "--root-certificates", str(ca)]) == 0
    assert launch.connection_main(["oscar", "--address", "10.213.77.9:8000", "--root-certificates", str(ca),
                                   "--default"]) == 0
    config = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert config["default"] == "oscar" and config["local"] == {"address": ":local:"}
    assert config["oscar"] == {"address": "10.213.77.9:8000", "root-certificates": str(ca.resolve())}
