"""Images signed and verified in a registry that speaks HTTPS and wants bearer tokens, as ghcr.io and Docker Hub do.

The distribution registry (v3.1.2) listens on a non-loopback address of this
machine (keyroom speaks plain HTTP to loopback registries only) with a
certificate from a test CA. Its ``auth: token`` trusts the certificate of the
token server this module runs on 127.0.0.1: the Docker registry token
protocol, HTTP basic credentials in, an ES256 JWT with an ``x5c`` header and
the granted ``access`` out. The token server speaks HTTPS too and its realm is
https://localhost:PORT: crane and cosign send no credentials to a plain-HTTP
realm of an HTTPS registry, nor to a realm named by a loopback or private IP.
The credentials reach crane, cosign and ``kubectl keyroom`` through a docker
config.json (``DOCKER_CONFIG``); the CA reaches keyroom through
``REQUESTS_CA_BUNDLE`` and the Go tools through ``SSL_CERT_FILE``.
"""
from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import pathlib
import re
import socket
import ssl
import subprocess
import threading
import urllib.parse
import uuid

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyroom.cli import registry as registry_client
from tests import tools
from tests.conftest import get, kubectl
from tests.integration.test_cli import NAMESPACE, keyroom
from tests.integration.test_cli_roles import offline
from tests.integration.test_images import digest_of, push, sign_with_approval, signing_key

pytestmark = pytest.mark.integration

USER, PASSWORD = "release-bot", "correct horse battery staple"
SERVICE, ISSUER = "keyroom-test-registry", "keyroom-test-token-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _pem(path, *objects) -> None:
    path.write_bytes(b"".join(
        o.public_bytes(serialization.Encoding.PEM) if isinstance(o, x509.Certificate)
        else o.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()) for o in objects))


def _certificate(subject: str, key, *, issuer=None, issuer_key=None, ca: bool = False,
                 names: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if names:
        alternatives = [x509.DNSName(n) if n.replace(".", "").isalpha() else x509.IPAddress(ipaddress.ip_address(n))
                        for n in names]
        builder = (builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key or key, hashes.SHA256())


def non_loopback_address() -> str:
    """An IPv4 address of this machine that is not loopback: keyroom speaks HTTPS to it."""
    candidates = []
    try:
        candidates += subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.255", 9))  # no packet is sent: this only picks the outgoing interface
            candidates.append(probe.getsockname()[0])
    except OSError:
        pass
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if address.version == 4 and not address.is_loopback and not address.is_unspecified:
            return candidate
    pytest.fail("the HTTPS registry test needs an IPv4 address of this machine that is not loopback (keyroom "
                f"speaks plain HTTP to loopback registries); found only {candidates or 'none'} "
                "(hostname -I, and the address of the default route)")


class TokenServer:
    """The Docker registry token protocol on 127.0.0.1: basic credentials in, a signed JWT granting the scopes out."""

    def __init__(self, key, certificate: x509.Certificate, *, tls: tuple[pathlib.Path, pathlib.Path] | None) -> None:
        self.key, self.certificate = key, certificate
        #: (user agent, user or None, requested scopes, HTTP status) of each token request
        self.requests: list[tuple[str, str | None, list[str], int]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
                user = server.authenticated(self.headers.get("Authorization", ""))
                if url.path != "/token" or query.get("service") != [SERVICE] or user is None:
                    status, body = 401, {"errors": [{"code": "UNAUTHORIZED", "message": "wrong credentials"}]}
                else:
                    status, body = 200, {"token": server.token(user, scopes), "expires_in": 300}
                server.requests.append((self.headers.get("User-Agent", ""), user, scopes, status))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="keyroom test token server"')
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        # named, not an IP literal: go-containerregistry refuses realms on loopback or private IP literals
        self.realm = f"{'https' if tls else 'http'}://localhost:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def authenticated(header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[len("Basic "):]).decode().partition(":")
        except ValueError:
            return None
        return user if (user, password) == (USER, PASSWORD) else None

    def token(self, user: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + 300, "nbf": now - 1, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def secure_registry(tmp_path_factory):
    """(the registry, the token server, the directory of the CA bundle ca.pem and the other certificates and keys):
    HTTPS on a non-loopback address, tokens required."""
    for name in tools.COMMANDS:  # built (or found in the cache) before the clock of any request starts
        tools.binary(name)
    address = non_loopback_address()
    root = tmp_path_factory.mktemp("secure-registry")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("keyroom test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(address, server_key, issuer=ca, issuer_key=ca_key, names=(address,))
    realm_key = ec.generate_private_key(ec.SECP256R1())
    realm = _certificate("localhost", realm_key, issuer=ca, issuer_key=ca_key, names=("localhost", "127.0.0.1"))
    token_key = ec.generate_private_key(ec.SECP256R1())
    token_certificate = _certificate("keyroom test token issuer", token_key)
    _pem(root / "ca.pem", ca)
    _pem(root / "server.pem", server, ca)
    _pem(root / "server.key", server_key)
    _pem(root / "realm.pem", realm, ca)
    _pem(root / "realm.key", realm_key)
    _pem(root / "token-issuer.pem", token_certificate)
    tokens = TokenServer(token_key, token_certificate, tls=(root / "realm.pem", root / "realm.key"))
    running = tools.Registry(root, address=address, tls=(root / "server.pem", root / "server.key"),
                             auth=token_auth(tokens, root))
    yield running, tokens, root
    running.stop()
    tokens.stop()


def token_auth(tokens: TokenServer, root: pathlib.Path) -> dict:
    """The registry's auth section: tokens from ``tokens``, signed with the certificate in root/token-issuer.pem."""
    return {"token": {"realm": tokens.realm, "service": SERVICE, "issuer": ISSUER,
                      "rootcertbundle": str(root / "token-issuer.pem")}}


def docker_config(directory, host: str, password: str):
    """A DOCKER_CONFIG directory whose config.json logs in to ``host`` as USER with ``password``."""
    directory.mkdir()
    auth = base64.b64encode(f"{USER}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return directory


def log_in(monkeypatch, directory: pathlib.Path, host: str, ca_bundle: pathlib.Path) -> None:
    """The environment (inherited by every tool the tests run) of someone logged in to ``host`` who trusts the CA."""
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(directory, host, PASSWORD)))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_bundle))
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_bundle))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.fixture
def logged_in(secure_registry, tmp_path, monkeypatch):
    """(the registry, the token server), logged in to the registry and trusting its CA."""
    registry, tokens, root = secure_registry
    log_in(monkeypatch, tmp_path / "docker", registry.host, root / "ca.pem")
    return registry, tokens


def any_public_key(directory) -> str:
    path = directory / "any.pub.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


def no_request(cluster, name: str) -> bool:
    found = kubectl(cluster, "get", "sr", name, "-n", NAMESPACE, "-o", "name")
    return found.returncode != 0 and "NotFound" in found.stderr


def test_the_registry_wants_a_token_over_https(logged_in):
    registry, tokens = logged_in
    anonymous = requests.get(f"https://{registry.host}/v2/", timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith(f'Bearer realm="{tokens.realm}",service="{SERVICE}"')
    refused = requests.get(tokens.realm, params={"service": SERVICE, "scope": "repository:team/app:pull"},
                           auth=(USER, "wrong"), timeout=30)
    assert refused.status_code == 401
    granted = requests.get(tokens.realm, params={"service": SERVICE, "scope": "repository:team/app:pull"},
                           auth=(USER, PASSWORD), timeout=30)
    assert granted.status_code == 200
    answer = requests.get(f"https://{registry.host}/v2/", timeout=30,
                          headers={"Authorization": f"Bearer {granted.json()['token']}"})
    assert answer.status_code == 200, answer.text  # the registry accepts the token server's JWT


def test_sign_image_and_verify_image_with_bearer_tokens_over_https(cluster, logged_in, unique, tmp_path):
    registry, tokens = logged_in
    key = signing_key(cluster, unique("img-https"), "ECDSA_P256")
    reference = push(registry, tmp_path, "team/private-app", "an image in a private registry\n")
    digest = digest_of(reference)
    assert reference.startswith(f"{registry.host}/") and registry.host.split(":")[0] not in ("127.0.0.1", "localhost")
    ours_before = len([r for r in tokens.requests if r[0].startswith("python-requests")])

    request = unique("img-https")
    signed = sign_with_approval(cluster, request, key, reference)
    assert signed.returncode == 0, signed.stderr
    assert "Traceback" not in signed.stderr
    report = json.loads(signed.stdout)
    assert report["phase"] == "Signed"
    assert [i["image"] for i in report["images"]] == [f"{reference.removesuffix(':v1')}@{digest}"]
    assert [i["signatureTag"] for i in report["images"]] == [
        f"{reference.removesuffix(':v1')}:{registry_client.signature_tag(digest)}"]
    assert get(cluster, "sr", request, namespace=NAMESPACE)["status"]["phase"] == "Signed"
    signature = tools.run("crane", "manifest",
                          f"{reference.removesuffix(':v1')}:{registry_client.signature_tag(digest)}")
    assert signature.returncode == 0, signature.stderr
    assert [layer["annotations"]["dev.cosignproject.cosign/signature"]
            for layer in json.loads(signature.stdout)["layers"]] == [report["images"][0]["signature"]]
    # keyroom's client (python-requests) got its tokens from the token server: pull to resolve, push to attach
    ours = [r for r in tokens.requests if r[0].startswith("python-requests")][ours_before:]
    assert ours and all(user == USER and status == 200 for _, user, _, status in ours)
    assert any("repository:team/private-app:pull,push" in scopes for _, _, scopes, _ in ours), ours

    trust = tmp_path / "trust"
    assert keyroom(cluster, "alice", "export", key, "--out", str(trust)).returncode == 0
    verified = tools.run("cosign", "verify", "--key", trust / f"{key}-v1.pub.pem", "--insecure-ignore-tlog=true",
                         reference, timeout=60)
    assert verified.returncode == 0, verified.stderr
    [claims] = json.loads(verified.stdout)
    assert claims["critical"]["image"]["docker-manifest-digest"] == digest
    verified = offline("verify-image", reference, "--trust", str(trust))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"verified: {reference.removesuffix(':v1')}@{digest}")


def test_a_wrong_password_fails_before_any_sign_request_exists(cluster, logged_in, unique, tmp_path, monkeypatch):
    registry, tokens = logged_in
    key = signing_key(cluster, unique("img-https-pw"), "ECDSA_P256")
    reference = push(registry, tmp_path, "team/locked", "an image for someone else\n")
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path / "wrong", registry.host, "not the password")))
    refused_before = sum(1 for r in tokens.requests if r[3] == 401)

    request = unique("img-https-pw")
    signing = keyroom(cluster, "alice", "sign-image", reference, "--key", key, "--name", request, "--timeout", "30")
    assert signing.returncode == 1, signing.stdout + signing.stderr
    assert "Traceback" not in signing.stderr
    assert f"{registry.host} refused a token for repository:team/locked:pull (401)" in signing.stderr
    assert "log in with docker login or crane auth login" in signing.stderr
    assert sum(1 for r in tokens.requests if r[3] == 401) > refused_before
    assert no_request(cluster, request)

    verifying = offline("verify-image", reference, "--key", any_public_key(tmp_path))
    assert verifying.returncode == 3, verifying.stdout + verifying.stderr
    assert f"NOT VERIFIED: {reference}: {registry.host} refused a token" in verifying.stdout


def test_without_the_ca_the_client_says_the_certificate_is_not_trusted(cluster, logged_in, unique, tmp_path,
                                                                     monkeypatch):
    registry, _ = logged_in
    key = signing_key(cluster, unique("img-https-ca"), "ECDSA_P256")
    reference = push(registry, tmp_path, "team/untrusted", "an image behind a certificate nobody trusts\n")
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):  # requests falls back to certifi's CAs: no test CA there
        monkeypatch.delenv(name)

    request = unique("img-https-ca")
    signing = keyroom(cluster, "alice", "sign-image", reference, "--key", key, "--name", request, "--timeout", "30")
    assert signing.returncode == 1, signing.stdout + signing.stderr
    assert "Traceback" not in signing.stderr
    # one line: OpenSSL's reason (the server sends the CA too: "self-signed certificate in certificate chain"),
    # without urllib3's pool and retry wrapping
    assert re.fullmatch(f"error: cannot reach {re.escape(registry.host)} over HTTPS: certificate verify failed: "
                        "self-signed certificate in certificate chain; when a private CA signed its certificate, "
                        "give that CA's PEM bundle in REQUESTS_CA_BUNDLE\n", signing.stderr), signing.stderr
    assert no_request(cluster, request)

    verifying = offline("verify-image", reference, "--key", any_public_key(tmp_path))
    assert verifying.returncode == 3 and "Traceback" not in verifying.stderr, verifying.stdout + verifying.stderr
    assert f"NOT VERIFIED: {reference}: cannot reach {registry.host} over HTTPS: certificate verify failed" \
        in verifying.stdout


def test_no_credentials_go_to_a_plain_http_token_server_of_an_https_registry(secure_registry, tmp_path, monkeypatch):
    registry, tokens, root = secure_registry
    plain_tokens = TokenServer(tokens.key, tokens.certificate, tls=None)
    (tmp_path / "registry").mkdir()
    other = tools.Registry(tmp_path / "registry", address=registry.address,
                           tls=(root / "server.pem", root / "server.key"), auth=token_auth(plain_tokens, root))
    try:
        log_in(monkeypatch, tmp_path / "docker", other.host, root / "ca.pem")
        anonymous = requests.get(f"https://{other.host}/v2/", timeout=30)
        assert anonymous.headers["WWW-Authenticate"].startswith(f'Bearer realm="{plain_tokens.realm}"')
        verifying = offline("verify-image", f"{other.host}/team/app:v1", "--key", any_public_key(tmp_path))
    finally:
        other.stop()
        plain_tokens.stop()
    assert verifying.returncode == 3, verifying.stdout + verifying.stderr
    assert (f"NOT VERIFIED: {other.host}/team/app:v1: {other.host} names a token server that is not HTTPS "
            f"({plain_tokens.realm}); no credentials are sent to it") in verifying.stdout
    assert plain_tokens.requests == []
