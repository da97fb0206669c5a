"""Just enough of the OCI distribution API to sign images by digest and attach their signatures as cosign does.

An image reference (``registry.example/team/app:1.4``) names a repository and
a tag, and a tag can move. What keyroom signs is the *manifest digest* the
registry answers for it at that moment (``Docker-Content-Digest``, or the
SHA-256 of the manifest's bytes), so :meth:`Registry.resolve` is the only way
a reference becomes something to sign. Signatures are attached the way cosign
attaches them: an OCI image manifest under the tag ``sha256-<hex>.sig`` whose
layers are simple-signing payloads, each annotated with its signature.

The registry speaks plain HTTP(S): anonymous, basic credentials from
``~/.docker/config.json`` (``auths``; credential helpers are not read), or the
token flow a ``401`` with ``WWW-Authenticate: Bearer`` asks for (the token server
of an HTTPS registry must be HTTPS too). Registries on loopback (localhost,
127.0.0.1, [::1]) are spoken to over HTTP, others over HTTPS unless ``insecure``
is set; a private CA's bundle is given in ``REQUESTS_CA_BUNDLE``.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import urllib.parse

import requests

from keyroom.signer.formats import cosign

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_HUB, DOCKER_HUB_API = "index.docker.io", "registry-1.docker.io"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
_TIMEOUT = 30


class RegistryError(Exception):
    """The registry refused or failed, or a reference is not usable; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Reference:
    """An image reference, split: registry host, repository path, tag and/or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The repository's full name, as cosign's docker-reference writes it."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> Reference:
    """``[host[:port]/]path[:tag][@sha256:hex]``; a path without a host is on Docker Hub (library/ for one part)."""
    rest, digest = (text.split("@", 1) + [None])[:2] if "@" in text else (text, None)
    if digest is not None and not _DIGEST.match(digest):
        raise RegistryError(f"{text}: the digest must be sha256: and 64 lowercase hex characters")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
    parts = rest.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, repository = parts[0], "/".join(parts[1:])
    else:
        registry, repository = DOCKER_HUB, rest if len(parts) > 1 else f"library/{rest}"
    reference = Reference(registry=registry, repository=repository, tag=tag, digest=digest)
    try:
        cosign.split_reference(reference.name + (f":{tag}" if tag else ""))
    except ValueError:
        raise RegistryError(f"{text} is not an image reference (registry.example/path/name[:tag][@sha256:...])") \
            from None
    if tag is None and digest is None:
        reference = dataclasses.replace(reference, tag="latest")
    return reference


def _docker_auths() -> dict:
    path = pathlib.Path(os.environ.get("DOCKER_CONFIG", pathlib.Path.home() / ".docker")) / "config.json"
    try:
        return json.loads(path.read_text()).get("auths") or {}
    except (OSError, ValueError):
        return {}


class Registry:
    """One registry host, spoken to over the distribution API v2."""

    def __init__(self, host: str, *, insecure: bool = False) -> None:
        self.host = host
        api_host = DOCKER_HUB_API if host == DOCKER_HUB else host
        plain = insecure or host.split(":")[0] in _LOOPBACK or host.startswith("[::1]")
        self.base = f"{'http' if plain else 'https'}://{api_host}/v2"
        self.session = requests.Session()
        self._tokens: dict[str, str] = {}
        found = _docker_auths()
        entry = found.get(host) or found.get(f"https://{host}") or (
            found.get("https://index.docker.io/v1/") if host == DOCKER_HUB else None) or {}
        self._basic = base64.b64decode(entry["auth"]).decode().split(":", 1) if entry.get("auth") else None

    def _send(self, method: str, url: str, **kwargs) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=_TIMEOUT, **kwargs)
        except requests.exceptions.SSLError as error:
            found = re.search(r"(certificate verify failed: .*?) \(_ssl", str(error))
            raise RegistryError(f"cannot reach {urllib.parse.urlsplit(url).netloc} over HTTPS: "
                                f"{found.group(1) if found else error}; when a private CA signed its certificate, "
                                "give that CA's PEM bundle in REQUESTS_CA_BUNDLE") from None
        except requests.RequestException as error:
            raise RegistryError(f"cannot reach {self.host}: {error}") from None

    def _token(self, challenge: str, scope: str) -> str:
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if "realm" not in fields:
            raise RegistryError(f"{self.host} asks for authentication this client does not speak: {challenge}")
        if self.base.startswith("https:") and not fields["realm"].startswith("https:"):
            raise RegistryError(f"{self.host} names a token server that is not HTTPS ({fields['realm']}); "
                                "no credentials are sent to it")
        # the scope this client needs, not the challenge's: a HEAD before a push is challenged for pull only,
        # and the token is kept for the pushes that follow it
        params = {"service": fields.get("service", ""), "scope": scope}
        answer = self._send("GET", fields["realm"], params=params, auth=tuple(self._basic) if self._basic else None)
        if answer.status_code != 200:
            raise RegistryError(f"{self.host} refused a token for {params['scope']} ({answer.status_code}); "
                                "log in with docker login or crane auth login")
        try:
            body = answer.json()
        except ValueError:
            raise RegistryError(f"{self.host}: the token server {fields['realm']} answered no JSON") from None
        return body.get("token") or body.get("access_token") or ""

    def _request(self, method: str, url: str, *, repository: str, push: bool = False, **kwargs) -> requests.Response:
        scope = f"repository:{repository}:{'pull,push' if push else 'pull'}"
        headers = dict(kwargs.pop("headers", {}))
        for _ in range(2):
            if scope in self._tokens:
                headers["Authorization"] = f"Bearer {self._tokens[scope]}"
            auth = tuple(self._basic) if self._basic and "Authorization" not in headers else None
            answer = self._send(method, url if "://" in url else self.base + url, headers=headers, auth=auth,
                                **kwargs)
            challenge = answer.headers.get("WWW-Authenticate", "")
            if answer.status_code != 401 or not challenge.lower().startswith("bearer") or scope in self._tokens:
                return answer
            self._tokens[scope] = self._token(challenge, scope)
        return answer

    def _failed(self, answer: requests.Response, what: str) -> RegistryError:
        return RegistryError(f"{self.host}: {what}: HTTP {answer.status_code} {answer.text[:300].strip()}")

    def manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        """(the manifest's bytes, its media type), or None when the registry has none under ``reference``."""
        answer = self._request("GET", f"/{repository}/manifests/{reference}", repository=repository,
                               headers={"Accept": ", ".join(MANIFEST_TYPES)})
        if answer.status_code == 404:
            return None
        if answer.status_code != 200:
            raise self._failed(answer, f"reading the manifest {repository}:{reference}")
        return answer.content, answer.headers.get("Content-Type", "").split(";")[0]

    def resolve(self, reference: Reference) -> str:
        """The manifest digest (sha256:<hex>) the registry holds for ``reference`` now; a given digest is checked."""
        wanted = reference.digest or reference.tag
        found = self.manifest(reference.repository, wanted)
        if found is None:
            raise RegistryError(f"{reference}: no such image in {self.host}")
        digest = "sha256:" + hashlib.sha256(found[0]).hexdigest()
        if reference.digest and digest != reference.digest:
            raise RegistryError(f"{reference}: the registry answered a manifest whose digest is {digest}")
        return digest

    def blob(self, repository: str, digest: str) -> bytes:
        """A blob, checked against its digest."""
        answer = self._request("GET", f"/{repository}/blobs/{digest}", repository=repository)
        if answer.status_code != 200:
            raise self._failed(answer, f"reading blob {digest}")
        if "sha256:" + hashlib.sha256(answer.content).hexdigest() != digest:
            raise RegistryError(f"{self.host}: blob {digest} does not have that digest")
        return answer.content

    def push_blob(self, repository: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self._request("HEAD", f"/{repository}/blobs/{digest}", repository=repository, push=True).status_code == 200:
            return digest
        started = self._request("POST", f"/{repository}/blobs/uploads/", repository=repository, push=True)
        if started.status_code not in (201, 202):
            raise self._failed(started, f"starting an upload to {repository}")
        location = started.headers["Location"]
        if "://" not in location:
            location = self.base[: -len("/v2")] + location
        answer = self._request("PUT", location, repository=repository, push=True, params={"digest": digest},
                               data=data, headers={"Content-Type": "application/octet-stream"})
        if answer.status_code != 201:
            raise self._failed(answer, f"uploading blob {digest} to {repository}")
        return digest

    def put_manifest(self, repository: str, tag: str, body: bytes, media_type: str) -> str:
        answer = self._request("PUT", f"/{repository}/manifests/{tag}", repository=repository, push=True,
                               data=body, headers={"Content-Type": media_type})
        if answer.status_code != 201:
            raise self._failed(answer, f"writing the manifest {repository}:{tag}")
        return "sha256:" + hashlib.sha256(body).hexdigest()


def signature_tag(digest: str) -> str:
    """cosign's tag for the signatures of the image with manifest ``digest``: sha256-<hex>.sig."""
    return digest.replace(":", "-") + ".sig"


def signature_layers(registry: Registry, repository: str, digest: str) -> list[dict]:
    """The layers of the image's signature manifest (none when it has no signatures)."""
    found = registry.manifest(repository, signature_tag(digest))
    if found is None:
        return []
    try:
        return [layer for layer in json.loads(found[0]).get("layers") or []
                if layer.get("mediaType") == cosign.PAYLOAD_MEDIA_TYPE]
    except ValueError:
        raise RegistryError(f"{registry.host}: the manifest {repository}:{signature_tag(digest)} is not JSON") from None


def attach(registry: Registry, repository: str, digest: str, *, payload: bytes, signature: bytes) -> str:
    """Add one signature to the image's signature manifest (kept: the signatures already there); its digest.

    Like cosign, a signature already present (same payload, same signature) is not added twice.
    """
    annotation = base64.b64encode(signature).decode("ascii")
    layers = signature_layers(registry, repository, digest)
    layer_digest = registry.push_blob(repository, payload)
    if not any(layer.get("digest") == layer_digest
               and (layer.get("annotations") or {}).get(cosign.SIGNATURE_ANNOTATION) == annotation for layer in layers):
        layers.append({"mediaType": cosign.PAYLOAD_MEDIA_TYPE, "size": len(payload), "digest": layer_digest,
                       "annotations": {cosign.SIGNATURE_ANNOTATION: annotation}})
    config = json.dumps({"architecture": "", "created": "0001-01-01T00:00:00Z",
                         "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "",
                         "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
                         "config": {}}, separators=(",", ":")).encode()
    config_digest = registry.push_blob(repository, config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "size": len(config), "digest": config_digest},
                           "layers": layers}, separators=(",", ":")).encode()
    return registry.put_manifest(repository, signature_tag(digest), manifest, OCI_MANIFEST)
