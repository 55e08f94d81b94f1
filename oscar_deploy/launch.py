"""``oscar-superlink`` and ``oscar-supernode``: the Flower processes of each machine with the project's defaults.

Both check their inputs before starting Flower (whose own errors for these cases are a retry loop or a
stack trace) and then ``exec`` the Flower command, so the PID a supervisor sees is Flower's:

- TLS is on unless ``--insecure`` is given; certificates come from ``oscar-certs`` and are parsed first.
- SuperNode authentication is on by default on the SuperLink; a SuperNode passes its private key.
- Runtime dependency installation stays off: the project is installed on every host already.
- ``--model-cache`` points Hugging Face at a pre-filled cache and forbids downloads during a run.
- Each SuperNode gets its own data dir and output dir (node config); the SuperLink's runs go under
  ``--workdir``/runs.
- A SuperNode first waits for its SuperLink's port and, with TLS, checks that the certificate it
  presents is valid for the address used, so a wrong address fails with a sentence, not a hang.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import os
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from oscar_deploy import certs

SUPERLINK_PORT = 8000  # Flower's default: Fleet, Control and Runtime APIs share it
SUPERNODE_PORT = 9094  # the SuperNode's local Runtime API (its ClientApp processes connect there)


class LaunchError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------- commands
def venv_bin(name: str) -> str:
    """Console scripts of the interpreter's own environment (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def node_config_arg(values: dict[str, Any]) -> str:
    """Flower's ``--node-config`` syntax: space-separated ``key=value`` with TOML values."""
    return " ".join(f"{key}={tomli_w.dumps({'v': value})[4:].strip()}" for key, value in values.items())


# ---------------------------------------------------------------------------------------------- checks
def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"'{address}' is not HOST:PORT (e.g. 10.0.0.5:{SUPERLINK_PORT} or superlink.example:8000)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise LaunchError(f"cannot resolve SuperLink host '{host}': {err.strerror}") from None
    return host, int(port)


def check_certificate(path: Path, what: str) -> Path:
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise LaunchError(f"{what} '{path}' does not exist (make it with oscar-certs, or pass --insecure "
                          "on a trusted network)") from None
    except ValueError:
        raise LaunchError(f"{what} '{path}' is not a PEM certificate") from None
    return path


def check_private_key(path: Path, openssh: bool) -> Path:
    """``openssh``: a SuperNode auth key (EC, OpenSSH format); otherwise a PEM TLS key."""
    try:
        data = path.read_bytes()
        key = load_ssh_private_key(data, password=None) if openssh else load_pem_private_key(data, password=None)
    except FileNotFoundError:
        raise LaunchError(f"private key '{path}' does not exist (make it with oscar-certs)") from None
    except ValueError as err:
        raise LaunchError(f"private key '{path}' cannot be loaded: {err}") from None
    if openssh and not isinstance(key, ec.EllipticCurvePrivateKey):
        raise LaunchError(f"SuperNode key '{path}' must be an EC key (oscar-certs makes SECP384R1)")
    return path


def wait_for_superlink(host: str, port: int, root_certificates: Path | None, timeout: float) -> None:
    """Wait for the port to open; with TLS, verify the presented certificate against ``host``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                if root_certificates is not None:
                    context = ssl.create_default_context(cafile=str(root_certificates))
                    context.set_alpn_protocols(["h2", "http/1.1"])
                    with context.wrap_socket(sock, server_hostname=host):
                        pass
                return
        except ssl.SSLCertVerificationError as err:
            raise LaunchError(f"the SuperLink at {host}:{port} presents a certificate that {root_certificates} "
                              f"does not accept for '{host}': {err.verify_message}. Reach it by a name/IP the "
                              "certificate lists (oscar-certs --server-name/--ip) or use the right CA") from None
        except ssl.SSLError as err:
            raise LaunchError(f"TLS handshake with {host}:{port} failed ({err.reason}); is it a SuperLink with TLS "
                              "on? (a SuperLink started with --insecure needs --insecure here too)") from None
        except OSError as err:
            if time.monotonic() > deadline:
                raise LaunchError(f"no SuperLink reachable at {host}:{port} after {timeout:.0f}s ({err}); check the "
                                  "address, that the SuperLink runs and that the port is open") from None
            time.sleep(1)


# ---------------------------------------------------------------------------------------------- commands
def superlink_command(certs_dir: Path | None, host: str, port: int, *, auth: bool, database: Path,
                      isolation: str) -> list[str]:
    """``flower-superlink`` with TLS from ``certs_dir`` (``None``: insecure), node authentication when ``auth``,
    its state in ``database``.

    ``isolation="process"``: the ServerApp runs in a separate ``flower-superexec``
    (its own container in docker/compose.yml) instead of a child process."""
    command = [venv_bin("flower-superlink"), "--host", host, "--port", str(port), "--isolation", isolation,
               # The app's dependencies are installed already; `uv sync` per run would need the internet.
               "--disable-runtime-dependency-installation"]
    if certs_dir is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(check_certificate(certs_dir / certs.CA_CERT, "CA certificate")),
                    "--ssl-certfile", str(check_certificate(certs_dir / certs.SERVER_CERT, "server certificate")),
                    "--ssl-keyfile", str(check_private_key(certs_dir / certs.SERVER_KEY, openssh=False))]
    if auth:
        command.append("--enable-supernode-auth")
    return command + ["--database", str(database)]


def supernode_command(superlink: str, root_certificates: Path | None, private_key: Path | None,
                      node_config: dict[str, Any], port: int = SUPERNODE_PORT, runtime_host: str = "127.0.0.1",
                      isolation: str = "subprocess") -> list[str]:
    """``flower-supernode`` for one client; ``root_certificates=None``: insecure.

    ``isolation="process"``: ClientApps run in a separate ``flower-superexec``
    that connects to ``runtime_host:port``."""
    parse_address(superlink)
    command = [venv_bin("flower-supernode"), "--superlink", superlink, "--host", runtime_host, "--port", str(port),
               "--isolation", isolation,
               "--node-config", node_config_arg(node_config)]
    if root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(check_certificate(root_certificates, "root certificate"))]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(check_private_key(private_key, openssh=True))]
    return command


def reserve_local_port(host: str, first: int, tries: int = 100) -> int:
    """``first`` if it is free, else the next free port, reserved for this process: SuperNodes on one host
    need one each, also when a script starts them all at once.

    A free port is only bound by flower-supernode seconds later (after the SuperLink answers and ``exec``),
    so two launchers started together would both find ``first`` free. Each port is therefore claimed with
    an exclusive lock on a file named after it before it is tested; the lock's descriptor survives ``exec``,
    so the port stays claimed until that flower-supernode exits.
    """
    for port in range(first, first + tries):
        lock = claim_port(host, port)
        if lock is None:
            continue  # another oscar-supernode of this user holds it
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                os.close(lock)  # in use by something else
                continue
        if port != first:
            print(f"port {first} on {host} is taken (another SuperNode?): using {port}", flush=True)
        return port
    raise LaunchError(f"no free port in {first}..{first + tries - 1} on {host}: pass --port")


def claim_port(host: str, port: int) -> int | None:
    """This user's lock on ``host:port``, held as long as this process and what it ``exec``s live (the
    descriptor is returned); None when another process holds it."""
    path = Path(tempfile.gettempdir()) / f"oscar-supernode-ports-{os.getuid()}" / f"{host}-{port}.lock"
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError as err:
        raise LaunchError(f"cannot make the port lock {path} ({err.strerror}): pass --port") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.set_inheritable(fd, True)  # kept open, and so locked, by flower-supernode after exec
    return fd


def connection_config(address: str, root_certificates: Path | None) -> dict[str, Any]:
    """A ``[superlink.<name>]`` entry of ``$FLWR_HOME/config.toml`` for ``flwr run`` / ``flwr supernode``."""
    if root_certificates is None:
        return {"address": address, "insecure": True}
    return {"address": address, "root-certificates": str(check_certificate(root_certificates, "root certificate"))}


def model_cache_env(cache: Path | None) -> dict[str, str]:
    """Hugging Face reads models from ``cache`` only: a missing model fails fast instead of downloading."""
    if cache is None:
        return {}
    if not cache.is_dir():
        raise LaunchError(f"model cache '{cache}' is not a directory (fill it with `hf download ...`, see docs/deployment.md)")
    return {"HF_HUB_CACHE": str(cache.resolve()), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------- CLIs
def _exec(command: list[str], env: dict[str, str], workdir: Path | None = None) -> None:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
    # flower-superlink starts flower-superexec by name: the venv's bin must be on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    print("$ " + " ".join(command), flush=True)
    os.execvpe(command[0], command, {**os.environ, "PATH": path, **env})


def _cli(main: Any) -> Any:
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            main(argv)
        except LaunchError as err:
            print(f"oscar-{main.__name__.removesuffix('_main')}: error: {err}", file=sys.stderr)
            return 2
        return 0  # not reached when exec succeeds
    return run


@_cli
def superlink_main(argv: list[str] | None = None) -> None:
    """The server machine: SuperLink (+ its ServerApp executor), TLS and SuperNode authentication on."""
    parser = argparse.ArgumentParser(prog="oscar-superlink", description=superlink_main.__doc__)
    parser.add_argument("--certs", type=Path, help="directory from oscar-certs (ca.crt, server.crt, server.key)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only)")
    parser.add_argument("--no-auth", action="store_true", help="accept SuperNodes without registered keys")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=SUPERLINK_PORT)
    parser.add_argument("--workdir", type=Path, default=Path("."), help="runs/ and the state database go here")
    parser.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                        help="process: the ServerApp runs in a separate flower-superexec (containers)")
    parser.add_argument("--model-cache", type=Path, help="Hugging Face cache with the server's models")
    args = parser.parse_args(argv)
    if args.insecure == (args.certs is not None):
        raise LaunchError("pass --certs DIR (TLS, from oscar-certs) or --insecure (trusted networks only)")
    workdir = args.workdir.resolve()
    command = superlink_command(args.certs.resolve() if args.certs else None, args.host, args.port,
                                auth=not args.no_auth, database=workdir / "superlink.db", isolation=args.isolation)
    _exec(command, model_cache_env(args.model_cache), workdir)


@_cli
def supernode_main(argv: list[str] | None = None) -> None:
    """A client machine: one SuperNode reading one client's images."""
    parser = argparse.ArgumentParser(prog="oscar-supernode", description=supernode_main.__doc__)
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink (port 8000 by default)")
    parser.add_argument("--root-certificates", type=Path, help="the federation's ca.crt (from oscar-certs)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only)")
    parser.add_argument("--auth-key", type=Path, help="this node's private key (oscar-certs --supernode NAME)")
    parser.add_argument("--data-dir", type=Path, required=True, help="<class_name>/<images> of this client")
    parser.add_argument("--name", help="the client's name in the report (default: the data dir's name)")
    parser.add_argument("--output-dir", type=Path, help="where the final weights go (default: in data dir)")
    parser.add_argument("--model-cache", type=Path, help="Hugging Face cache with BLIP and the text encoder")
    parser.add_argument("--port", type=int, default=None,
                        help=f"local Runtime API port (default {SUPERNODE_PORT}, or the next free one: every "
                             "SuperNode on one host needs its own)")
    parser.add_argument("--no-auth", action="store_true",
                        help="no --auth-key (only for a SuperLink started with oscar-superlink --no-auth)")
    parser.add_argument("--node-config", default="",
                        help="more node config for the client, e.g. \"dp-epsilon=4 min-images-per-class=20\"")
    parser.add_argument("--runtime-host", default="127.0.0.1", help="address the Runtime API listens on")
    parser.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                        help="process: ClientApps run in a separate flower-superexec (containers)")
    parser.add_argument("--connect-timeout", type=float, default=300,
                        help="seconds to wait for the SuperLink before giving up")
    args = parser.parse_args(argv)
    if args.insecure == (args.root_certificates is not None):
        raise LaunchError("pass --root-certificates CA_CERT (TLS, from oscar-certs) or --insecure")
    parse_address(args.superlink)
    if args.auth_key is None and not args.no_auth:
        raise LaunchError("no --auth-key: the SuperLink accepts only registered SuperNodes (oscar-superlink turns "
                          "authentication on), so pass this client's private key from oscar-certs "
                          "(--auth-key supernodes/<name>.key), or --no-auth if the SuperLink runs with --no-auth")
    if not args.data_dir.is_dir():
        raise LaunchError(f"data dir '{args.data_dir}' does not exist")
    node_config: dict[str, Any] = {"data-dir": str(args.data_dir.resolve()), "name": args.name or args.data_dir.name}
    if args.node_config:
        from flwr.common.config import parse_config_args

        try:
            node_config.update(parse_config_args([args.node_config]))
        except Exception as err:  # noqa: BLE001 - Flower's parser raises several kinds
            raise LaunchError(f"--node-config {args.node_config!r} is not 'key=value ...' with TOML values: {err}")
    if args.output_dir is not None:
        node_config["output-dir"] = str(args.output_dir.resolve())
    root = args.root_certificates.resolve() if args.root_certificates else None
    if args.port is not None:
        port = args.port
        try:
            claim_port(args.runtime_host, port)  # so that a launcher choosing its own port passes this one by
        except LaunchError:
            pass  # the port was chosen by hand: the claim is a courtesy to other launchers
    else:
        port = reserve_local_port(args.runtime_host, SUPERNODE_PORT)
    command = supernode_command(args.superlink, root, args.auth_key.resolve() if args.auth_key else None,
                                node_config, port, args.runtime_host, args.isolation)
    env = model_cache_env(args.model_cache)
    wait_for_superlink(*parse_address(args.superlink), root, args.connect_timeout)
    _exec(command, env)


@_cli
def connection_main(argv: list[str] | None = None) -> None:
    """Add (or update) a SuperLink connection in $FLWR_HOME/config.toml (default ~/.flwr), for flwr run."""
    parser = argparse.ArgumentParser(prog="oscar-connection", description=connection_main.__doc__)
    parser.add_argument("name", help="the connection's name, e.g. oscar: `flwr run . oscar`")
    parser.add_argument("--address", required=True, help="HOST:PORT of the SuperLink (port 8000 by default)")
    parser.add_argument("--root-certificates", type=Path, help="the federation's ca.crt (from oscar-certs)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (trusted networks only)")
    parser.add_argument("--default", action="store_true", help="make it the default connection")
    args = parser.parse_args(argv)
    if args.insecure == (args.root_certificates is not None):
        raise LaunchError("pass --root-certificates CA_CERT (TLS) or --insecure")
    parse_address(args.address)
    # Flower's own reader/writer: an existing config.toml (e.g. its `local` connection) is kept as it is.
    from flwr.cli.flower_config import set_default_superlink_connection, write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection
    from flwr.supercore.utils import get_flwr_home

    root = str(check_certificate(args.root_certificates.resolve(), "root certificate")) if args.root_certificates else None
    write_superlink_connection(SuperLinkConnection(name=args.name, address=args.address, root_certificates=root,
                                                   insecure=True if args.insecure else None))
    if args.default:
        set_default_superlink_connection(args.name)
    print(f"connection '{args.name}' -> {args.address} written to {get_flwr_home() / 'config.toml'}")


ROLES = {"superlink": superlink_main, "supernode": supernode_main, "connection": connection_main}

if __name__ == "__main__":  # python -m oscar_deploy.launch {superlink,supernode} ...
    if len(sys.argv) < 2 or sys.argv[1] not in ROLES:
        sys.exit(f"usage: python -m oscar_deploy.launch {{{','.join(ROLES)}}} [--help]")
    sys.exit(ROLES[sys.argv.pop(1)]())
