"""``kubectl keyroom apksigner``: signing APKs with apksigner itself, its key in keyroom's HSM.

``apksigner provider`` compiles the JCA provider shipped with the plugin
(``java/KeyroomProvider.java``) into a jar with the local JDK. apksigner loads
it with ``--provider-class dev.keyroom.apksigner.KeyroomProvider``: its key
store ``KEYROOM`` holds the named Certificate (read through ``apksigner
certificate``), and each ``Signature.sign()`` apksigner makes runs ``apksigner
sign`` with the bytes to sign. That verb makes one SignRequest of format apk
for them (with the v3 signed data that follows a v2 one, see
:func:`keyroom.cli.apk.apksigner_blocks`), waits for the approvals like
``sign``, and prints one line per signed block: the SHA-256 of the signed data
and the signature, both for the provider. The signer checks the blocks as for
any APK request; the provider holds no key and verifies nothing itself
(apksigner verifies each signature it gets with the certificate).
"""
from __future__ import annotations

import base64
import binascii
import importlib.resources
import pathlib
import shutil
import subprocess
import sys
import tempfile

import click

from keyroom.cli import apk
from keyroom.cli.common import (ERROR, GROUP, INTERRUPTED, OK, USAGE_OR_TIMEOUT, VERSION, CliError, note,
                                with_target)
from keyroom.signer.formats import apk as apk_format

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
PROVIDER_CLASS = "dev.keyroom.apksigner.KeyroomProvider"
#: the signed data apksigner hands over is a few hundred bytes; its base64 with room to spare
MAX_INPUT = 4 * apk_format.MAX_SIGNED_DATA


@click.group(context_settings=CONTEXT)
def apksigner() -> None:
    """Sign APKs with Android's apksigner, the key staying in keyroom's HSM.

    \b
    kubectl keyroom apksigner provider --out keyroom-apksigner.jar     (needs a JDK)
    apksigner sign --provider-class dev.keyroom.apksigner.KeyroomProvider \\
        --provider-arg namespace=team-a,key=KEY,certificate=CERT,reason='android 3.1.0' \\
        --ks NONE --ks-type KEYROOM --ks-pass pass:none \\
        --v1-signing-enabled false --v4-signing-enabled false --min-sdk-version 24 \\
        --in app.apk --out app-signed.apk
    (with the jar on apksigner's class path; see docs/guides/android.md)
    """


@apksigner.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=pathlib.Path), default=pathlib.Path("keyroom-apksigner.jar"),
              show_default=True, help="the jar to write")
def provider(out: pathlib.Path) -> int:
    """Build the provider jar apksigner loads, from the source shipped with this plugin (javac and jar)."""
    javac, jar = shutil.which("javac"), shutil.which("jar")
    if not javac or not jar:
        raise CliError("building the provider needs a JDK (javac and jar on PATH), e.g. apt-get install "
                       "openjdk-17-jdk-headless")
    source = importlib.resources.files("keyroom.cli").joinpath("java", "KeyroomProvider.java")
    with tempfile.TemporaryDirectory() as work, importlib.resources.as_file(source) as path:
        classes = pathlib.Path(work) / "classes"
        for command in ([javac, "--release", "11", "-nowarn", "-d", str(classes), str(path)],
                        [jar, "--create", "--file", str(pathlib.Path(work) / "provider.jar"), "-C", str(classes),
                         "."]):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise CliError(f"{pathlib.Path(command[0]).name} failed: {result.stderr.strip()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pathlib.Path(work) / "provider.jar", out)
    print(out)
    note(f"apksigner loads it from its class path as {PROVIDER_CLASS}; see kubectl keyroom apksigner --help")
    return OK


@apksigner.command(context_settings=CONTEXT)
@click.argument("name")
@with_target
def certificate(name: str, target) -> int:
    """Print the Certificate NAME's current certificate (PEM): the provider's key store entry."""
    from keyroom.cli.plugin import _certificate_der
    from cryptography import x509 as crypto_x509
    from cryptography.hazmat.primitives import serialization

    der = _certificate_der(target.cluster, name)
    sys.stdout.write(crypto_x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode())
    return OK


def request_body(*, key: str, certificate: str, namespace: str, identity: dict, name: str, reason: str,
                 digest_algorithm: str, digest: bytes, blocks: list[tuple[str, bytes]]) -> dict:
    """The SignRequest of format apk for the signed data apksigner built, as ``sign --format apk`` makes it."""
    spec = {"keyRef": {"name": key}, "requester": identity, "format": "apk", "digestAlgorithm": digest_algorithm,
            "digests": [{"name": name, "value": digest.hex()}], "certificateRef": {"name": certificate},
            "apk": {"signedData": [{"scheme": scheme, "value": base64.b64encode(data).decode()}
                                   for scheme, data in blocks]}}
    if reason:
        spec["reason"] = reason
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SignRequest",
            "metadata": {"namespace": namespace, "generateName": f"{key}-"}, "spec": spec}


@apksigner.command(context_settings=CONTEXT)
@click.option("--key", required=True, help="the SigningKey of the namespace")
@click.option("--certificate", "certificate_name", required=True, help="the Certificate the APK is signed with")
@click.option("--name", default="app.apk", show_default=True, help="the APK's name, as approvers see it")
@click.option("--reason", default="", help="shown to approvers")
@click.option("--timeout", type=float, default=600, show_default=True, help="seconds to wait for the signature")
@click.option("--v3-min-sdk", type=click.IntRange(1), default=apk.APKSIG_V3_MIN_SDK, show_default=True,
              help="the minimum SDK of the v3 signed data apksigner builds after v2")
@click.option("--max-sdk", type=click.IntRange(1), default=apk_format.V3_MAX_SDK, show_default=True,
              help="apksigner's --max-sdk-version")
@with_target
def sign(key, certificate_name, name, reason, timeout, v3_min_sdk, max_sdk, target) -> int:
    """(Run by the provider.) Sign the signed data on stdin (base64) through one SignRequest.

    Prints "SHA256-OF-SIGNED-DATA BASE64-SIGNATURE" per block the signer signed.
    """
    from keyroom.cli import plugin

    text = sys.stdin.read(MAX_INPUT + 1)
    if len(text) > MAX_INPUT:
        raise CliError(f"the signed data on stdin is longer than {MAX_INPUT} base64 characters")
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise CliError("stdin holds no base64 signed data") from None
    cluster = target.cluster
    der = plugin._certificate_der(cluster, certificate_name)
    try:
        digest_algorithm, digest, blocks = apk.apksigner_blocks(data, certificate_der=der, min_sdk=v3_min_sdk,
                                                                max_sdk=max_sdk)
    except apk.ApkError as error:
        raise CliError(str(error)) from None
    body = request_body(key=key, certificate=certificate_name, namespace=cluster.namespace,
                        identity=cluster.whoami(), name=name, reason=reason, digest_algorithm=digest_algorithm,
                        digest=digest, blocks=blocks)
    created = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "signrequests", body)
    request = created["metadata"]["name"]
    note(f"keyroom: {request} in {cluster.namespace} asks to sign {name} ({', '.join(s for s, _ in blocks)}); "
         f"waiting up to {timeout:.0f}s for its approvals")
    try:
        final = plugin.wait_final(cluster, created, timeout)
    except (TimeoutError, KeyboardInterrupt) as stopped:
        note(f"keyroom: stopped waiting; {request} stays: kubectl keyroom status {request} -n {cluster.namespace}")
        return USAGE_OR_TIMEOUT if isinstance(stopped, TimeoutError) else INTERRUPTED
    status = final["status"]
    if status["phase"] != "Signed":
        note(f"keyroom: {request}: {status['phase']}: {status.get('message', '')}")
        return ERROR
    signatures = apk.signatures_by_data(base64.b64decode(status["signatures"][0]["value"]))
    for sha256, signature in sorted(signatures.items()):
        print(sha256, base64.b64encode(signature).decode())
    note(f"keyroom: {request} signed")
    return OK
