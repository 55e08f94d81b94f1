"""``oscar-certs``: TLS material for a SuperLink and authentication keys for its SuperNodes.

Writes, under ``--out``::

    ca.crt  ca.key            a private certificate authority (copy ca.crt to every SuperNode host)
    server.crt  server.key    the SuperLink's certificate, valid for every --server-name and --ip given
                              (plus localhost/127.0.0.1: the SuperLink's own ServerApp executor connects there)
    supernodes/<name>.key     one SuperNode's private key (EC SECP384R1, OpenSSH format, what Flower loads)
    supernodes/<name>.pub     its public key, registered with ``flwr supernode register``

Existing files are never overwritten (a new CA would silently invalidate every deployed copy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
SUPERNODES_DIR = "supernodes"
VALID_DAYS = 365
# Names the SuperLink is always reached by on its own host (ServerApp executor, `flwr` run there).
LOCAL_NAMES, LOCAL_IPS = ("localhost",), ("127.0.0.1", "::1")


def _private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as handle:  # "x": refuse to overwrite
        handle.write(data)
    if private:
        path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(out: Path, common_name: str = "OSCAR federation CA") -> None:
    key = _private_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=10 * VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write(out / CA_KEY, _pem_key(key), private=True)
    _write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))


def make_server_cert(out: Path, names: list[str], ips: list[str]) -> None:
    """A SuperLink certificate signed by the CA in ``out``, with every name and IP as a SAN."""
    ca_key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    all_names = list(dict.fromkeys([*names, *LOCAL_NAMES]))
    all_ips = list(dict.fromkeys([*ips, *LOCAL_IPS]))
    san = x509.SubjectAlternativeName([*(x509.DNSName(n) for n in all_names),
                                       *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in all_ips)])
    key = _private_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(all_names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / SERVER_KEY, _pem_key(key), private=True)
    _write(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))


def make_supernode_keys(out: Path, name: str) -> tuple[Path, Path]:
    """``supernodes/<name>.key`` / ``.pub``: the key pair a SuperNode authenticates with."""
    key = _private_key()
    private, public = out / SUPERNODES_DIR / f"{name}.key", out / SUPERNODES_DIR / f"{name}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def make_all(out: Path, server_names: list[str], ips: list[str], supernodes: list[str]) -> None:
    """CA (unless ``out`` has one already), server certificate, and one key pair per SuperNode."""
    for ip in ips:
        ipaddress.ip_address(ip)  # a typo fails here, not as a TLS error on the first connection
    out.mkdir(parents=True, exist_ok=True)
    if not (out / CA_CERT).exists():
        make_ca(out)
    if server_names or ips:
        make_server_cert(out, server_names, ips)
    for name in supernodes:
        make_supernode_keys(out, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the files (created)")
    parser.add_argument("--server-name", action="append", default=[],
                        help="DNS name SuperNodes use to reach the SuperLink (repeatable)")
    parser.add_argument("--ip", nargs="+", action="extend", default=[],
                        help="IP address(es) SuperNodes use to reach the SuperLink")
    parser.add_argument("--supernode", action="append", default=[], metavar="NAME",
                        help="make an authentication key pair for this SuperNode (repeatable)")
    args = parser.parse_args(argv)
    try:
        make_all(args.out, args.server_name, args.ip, args.supernode)
    except FileExistsError as err:
        print(f"oscar-certs: {err.filename} exists; remove it or choose another --out", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"oscar-certs: {err}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    print(f"oscar-certs: wrote into {out}:")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        role = _ROLES.get(path.name) or ("SuperNode private key: copy to that client only" if path.suffix == ".key"
                                          else "SuperNode public key: register it on the SuperLink")
        print(f"  {path.relative_to(out)}  ({role})")
    print("next:\n"
          f"  server:  oscar-superlink --certs {out} --workdir /srv/oscar\n"
          f"           oscar-connection oscar --address <SERVER>:8000 --root-certificates {out / CA_CERT} --default\n"
          f"           for key in {out}/supernodes/*.pub; do flwr supernode register \"$key\" oscar; done\n"
          f"  clients: copy {CA_CERT} and supernodes/<name>.key, then oscar-supernode --superlink <SERVER>:8000 "
          f"--root-certificates {CA_CERT} --auth-key <name>.key --data-dir ...")
    return 0


_ROLES = {CA_CERT: "CA certificate: copy to every client", "ca.key": "CA private key: never leaves the server",
          SERVER_CERT: "SuperLink certificate", SERVER_KEY: "SuperLink private key: stays on the server"}


if __name__ == "__main__":
    sys.exit(main())
