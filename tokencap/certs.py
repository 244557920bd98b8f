"""The per-user interception CA, and the trust bundles that the proxy and the agent use.

tokencap signs the certificates of intercepted model-API hosts with a private CA that lives in
its data directory, one per user, never installed system-wide. The agent trusts it only through
the CA variables of its own environment, each pointing at one combined bundle: every
certificate the user already trusted plus tokencap's CA. The proxy verifies real upstream
servers against the user's trust store alone, so a network that inspects TLS with its own CA,
or a test server with a test CA, verifies as it does for the user's other tools.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import getpass
import hashlib
import logging
import os
import re
import socket
import ssl
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tokencap.errors import ConfigError

logger = logging.getLogger(__name__)

# mitmproxy loads its CA from <confdir>/mitmproxy-ca.pem (key and certificate).
CA_BASENAME = "mitmproxy"
CA_KEY_SIZE = 2048
# A CA closer than this to its end is replaced, so that no run starts with a CA that expires
# while it runs.
RENEW_BEFORE = datetime.timedelta(days=30)

CA_FILE_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CODEX_CA_CERTIFICATE",
    "AWS_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "CARGO_HTTP_CAINFO",
    "DENO_CERT",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
    "NIX_SSL_CERT_FILE",
    "HTTPLIB2_CA_CERTS",
)
"""Variables that name one PEM file of trusted certificates, as common clients read them."""

CA_DIR_VARIABLE = "SSL_CERT_DIR"

# System bundle paths of Linux distributions, tried after OpenSSL's own compiled-in default.
_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
)

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


@dataclass(frozen=True)
class Trust:
    """The files one run uses: the CA directory, the user's trust store and the child's bundle."""

    ca_dir: Path
    ca_cert: Path
    upstream_bundle: Path  # the user's trust store, for verifying upstream servers
    child_bundle: Path  # the user's trust store plus tokencap's CA
    child_cert_dir: Path  # the same certificates as an OpenSSL hashed directory

    def child_variables(self) -> dict[str, str]:
        """Return every CA variable of the agent's environment, pointing at the bundle."""
        variables = {name: str(self.child_bundle) for name in CA_FILE_VARIABLES}
        variables[CA_DIR_VARIABLE] = str(self.child_cert_dir)
        return variables


def prepare(ca_dir: Path, env: Mapping[str, str]) -> Trust:
    """Create or load the user's CA in `ca_dir`, and write the bundles for this run.

    Raises ConfigError when the CA directory or key is readable by other users.
    """
    with _locked(ca_dir):
        ca_cert = ensure_ca(ca_dir)
        certificates = user_trust_store(env)
        ca_pem = _pem_blocks(ca_cert.read_bytes())
        upstream_bundle = _write_bundle(ca_dir, "trust", certificates)
        child_bundle = _write_bundle(ca_dir, "bundle", certificates + ca_pem)
        child_cert_dir = _write_hashed_dir(child_bundle, certificates + ca_pem)
    return Trust(ca_dir, ca_cert, upstream_bundle, child_bundle, child_cert_dir)


# --- The CA -----------------------------------------------------------------------------------


def ensure_ca(ca_dir: Path) -> Path:
    """Return the CA certificate file, creating the CA first when it is missing or expiring."""
    _check_private_dir(ca_dir)
    key_file = ca_dir / f"{CA_BASENAME}-ca.pem"
    cert_file = ca_dir / f"{CA_BASENAME}-ca-cert.pem"
    if key_file.exists():
        _check_private_file(key_file)
        if cert_file.exists() and not _expiring(cert_file):
            return cert_file
        logger.info("replacing the interception CA in %s: it expires soon", ca_dir)
        for old in ca_dir.glob(f"{CA_BASENAME}-*"):
            old.unlink()

    from mitmproxy.certs import CertStore

    user = _user_name()
    # create_store writes the key under a umask of 077, so the key file is mode 0600.
    CertStore.create_store(
        ca_dir,
        CA_BASENAME,
        CA_KEY_SIZE,
        organization="tokencap",
        cn=f"tokencap interception CA for {user}@{socket.gethostname()}",
    )
    _check_private_file(key_file)
    logger.info("created the interception CA %s", cert_file)
    return cert_file


def _check_private_dir(ca_dir: Path) -> None:
    try:
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the CA directory {ca_dir}: {exc.strerror or exc}; "
            "set XDG_DATA_HOME to a writable directory"
        ) from None
    info = ca_dir.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"the CA directory {ca_dir} belongs to another user (uid {info.st_uid}); "
            "set XDG_DATA_HOME to a directory of your own"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            f"the CA directory {ca_dir} is open to other users "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 700 {ca_dir}"
        )


def _check_private_file(key_file: Path) -> None:
    info = key_file.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            f"the CA key {key_file} is readable by other users "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {key_file}, or delete "
            "it to have tokencap create a new CA"
        )


def _expiring(cert_file: Path) -> bool:
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    return certificate.not_valid_after_utc - now < RENEW_BEFORE


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    # Two runs that start together must not both create a CA: one would trust the other's.
    _check_private_dir(ca_dir)
    with open(ca_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- The user's trust store -------------------------------------------------------------------


def user_trust_store(env: Mapping[str, str]) -> list[bytes]:
    """Return every certificate the user's clients trust, as PEM blocks without duplicates.

    That is the system bundle plus every file a CA variable names and every certificate in
    `SSL_CERT_DIR`, so each client keeps trusting what it trusted before, whichever variable
    it reads.
    """
    sources = [Path(p) for p in _system_bundles()]
    sources += [Path(env[name]) for name in CA_FILE_VARIABLES if env.get(name)]
    if env.get(CA_DIR_VARIABLE):
        for directory in env[CA_DIR_VARIABLE].split(os.pathsep):
            path = Path(directory)
            if path.is_dir():
                sources += sorted(p for p in path.iterdir() if p.is_file())

    blocks: dict[bytes, bytes] = {}
    for source in sources:
        try:
            data = source.read_bytes()
        except OSError as exc:
            logger.warning("cannot read the trusted certificates in %s: %s", source, exc)
            continue
        for block in _pem_blocks(data):
            blocks.setdefault(_normalized(block), block)
    if not blocks:
        import certifi

        logger.warning("no system trust store found; using certifi's bundle")
        blocks = {_normalized(b): b for b in _pem_blocks(Path(certifi.where()).read_bytes())}
    return list(blocks.values())


def _system_bundles() -> list[str]:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.openssl_cafile, *_SYSTEM_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return [candidate]
    return []


def _pem_blocks(data: bytes) -> list[bytes]:
    return [match.group(0).replace(b"\r\n", b"\n") for match in _PEM_CERTIFICATE.finditer(data)]


def _normalized(block: bytes) -> bytes:
    return b"".join(block.split())


# --- Bundles ----------------------------------------------------------------------------------


def _write_bundle(ca_dir: Path, kind: str, blocks: list[bytes]) -> Path:
    """Write the certificates to a file named by its content, which concurrent runs share."""
    content = b"\n".join(blocks) + b"\n"
    digest = hashlib.sha256(content).hexdigest()[:16]
    bundles = ca_dir / "bundles"
    bundles.mkdir(mode=0o700, exist_ok=True)
    path = bundles / f"{kind}-{digest}.pem"
    if not path.exists():
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(content)
        temporary.replace(path)
    return path


def _write_hashed_dir(bundle: Path, blocks: list[bytes]) -> Path:
    """Write the certificates as files named by subject hash, the layout SSL_CERT_DIR needs."""
    from OpenSSL import crypto

    directory = bundle.with_suffix(".d")
    if directory.is_dir():
        return directory
    temporary = bundle.with_suffix(f".{os.getpid()}.d.tmp")
    temporary.mkdir(mode=0o700, exist_ok=True)
    for block in blocks:
        try:
            subject_hash = crypto.load_certificate(crypto.FILETYPE_PEM, block).subject_name_hash()
        except crypto.Error:
            continue
        index = 0
        while (temporary / f"{subject_hash:08x}.{index}").exists():
            index += 1
        (temporary / f"{subject_hash:08x}.{index}").write_bytes(block + b"\n")
    try:
        temporary.rename(directory)
    except OSError:
        # Another run wrote the same directory first; its content is identical.
        for leftover in temporary.iterdir():
            leftover.unlink()
        temporary.rmdir()
    return directory
