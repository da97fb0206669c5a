"""The Helm chart, checked with a real helm (built from its pinned Go module) and the local control plane.

What the chart generates from operator/keyroom/api (CRDs, admission policies, ClusterRoles, bindings) must be
what `make crds` writes; bad values are refused before anything is applied; the rendered manifests pass a
server-side dry run; the pods meet the restricted Pod Security Standard; and `helm install` then `helm upgrade`
into the control plane keep the generated PINs and TLS material.
"""
from __future__ import annotations

import base64
import json
import pathlib
import subprocess

import pytest
import yaml
from cryptography import x509

from keyroom.api import manifests
from keyroom.devenv import helm as helm_module
from tests.conftest import REPO, kubectl

CHART = REPO / "charts" / "keyroom"
#: the namespace the local control plane binds the components in (the chart's bindings must match it)
NAMESPACE = "keyroom-system"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def helm() -> pathlib.Path:
    return helm_module.ensure(log=print)


def run(helm: pathlib.Path, *args: str, cluster=None, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(helm), *args]
    if cluster is not None:
        command += ["--kubeconfig", str(cluster.kubeconfig())]
    result = subprocess.run(command, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
    return result


def render(helm: pathlib.Path, *values: str) -> list[dict]:
    settings = [argument for value in values for argument in ("--set", value)]
    text = run(helm, "template", "keyroom", str(CHART), "-n", NAMESPACE, *settings).stdout
    return [document for document in yaml.safe_load_all(text) if document]


def by_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def test_the_chart_lints(helm):
    result = run(helm, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_the_rendered_chart_carries_every_crd_policy_and_role_of_crds(helm):
    documents = render(helm)
    expected = manifests.all_manifests()
    for kind in ("CustomResourceDefinition", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
                 "ClusterRole"):
        shipped = {d["metadata"]["name"]: d for d in expected if d["kind"] == kind}
        rendered = by_kind(documents, kind)
        assert set(rendered) == set(shipped), kind
        for name, document in rendered.items():
            if kind == "CustomResourceDefinition":
                # uninstalling the chart must never delete the CRDs (and with them every key and request)
                assert document["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
                document = {**document, "metadata": {**document["metadata"], "annotations": {
                    k: v for k, v in document["metadata"]["annotations"].items() if k != "helm.sh/resource-policy"}}}
                if not document["metadata"]["annotations"]:
                    del document["metadata"]["annotations"]
            assert document == shipped[name], f"{kind} {name} differs from crds/"


def test_crds_can_be_left_to_another_tool(helm):
    assert not by_kind(render(helm, "crds.install=false"), "CustomResourceDefinition")


@pytest.mark.parametrize(("setting", "message"), [
    ("signer.replicas=2", "additional properties 'replicas' not allowed"),
    ("signer.tokenLabel=" + "x" * 33, "/signer/tokenLabel"),
    ("signer.tls.mode=selfSigned", "/signer/tls/mode"),
    ("podSecurityContext.runAsNonRoot=false", "/podSecurityContext/runAsNonRoot"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("signer.persistence.size=lots", "/signer/persistence/size"),
    ("signer.persistence.ephemeral=true", "enabled and ephemeral exclude each other"),
    ("signer.softhsm.initToken=false", "signer.pinSecret: name the Secret with the PIN"),
    ("metrics.service=false,metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor needs metrics.service"),
])
def test_bad_values_are_refused_with_a_message_naming_them(helm, setting, message):
    result = run(helm, "template", "keyroom", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_signer_is_one_pod_that_only_the_operator_reaches(helm):
    documents = render(helm)
    signer = by_kind(documents, "Deployment")["keyroom-signer"]
    assert signer["spec"]["replicas"] == 1 and signer["spec"]["strategy"] == {"type": "Recreate"}
    policy = by_kind(documents, "NetworkPolicy")["keyroom-signer"]
    assert policy["spec"]["podSelector"]["matchLabels"] == signer["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    operator = by_kind(documents, "Deployment")["keyroom-operator"]
    assert peer["podSelector"]["matchLabels"] == operator["spec"]["selector"]["matchLabels"]
    # the operator mounts only the CA of the signer's TLS Secret, never its key
    (ca_volume,) = [v for v in operator["spec"]["template"]["spec"]["volumes"] if v["name"] == "signer-ca"]
    assert ca_volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_a_vendor_hsm_gets_its_module_volume_and_no_softhsm_init(helm):
    documents = render(helm, "signer.softhsm.initToken=false", "signer.pinSecret=luna-pin",
                       "signer.pkcs11Module=/opt/vendor/lib/libCryptoki2.so",
                       "signer.extraVolumes[0].name=vendor", "signer.extraVolumes[0].hostPath.path=/opt/vendor",
                       "signer.extraVolumeMounts[0].name=vendor", "signer.extraVolumeMounts[0].mountPath=/opt/vendor")
    assert "keyroom-hsm-pin" not in by_kind(documents, "Secret")
    pod = by_kind(documents, "Deployment")["keyroom-signer"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KEYROOM_PKCS11_MODULE"] == "/opt/vendor/lib/libCryptoki2.so"
    assert {"name": "vendor", "mountPath": "/opt/vendor"} in container["volumeMounts"]
    assert {"name": "pin", "secret": {"secretName": "luna-pin", "items": [{"key": "pin", "path": "pin"}]}} \
        in pod["volumes"]


def test_cert_manager_issues_the_signer_certificate_for_its_service_name(helm):
    documents = render(helm, "signer.tls.mode=certManager")
    certificate = by_kind(documents, "Certificate")["keyroom-signer"]
    assert f"keyroom-signer.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["secretName"] == "keyroom-signer-tls"
    assert "keyroom-signer-tls" not in by_kind(documents, "Secret")


def test_the_rendered_chart_passes_a_server_side_dry_run(helm, cluster):
    text = run(helm, "template", "keyroom", str(CHART), "-n", NAMESPACE).stdout
    result = kubectl(cluster, "apply", "--dry-run=server", "--server-side", "--force-conflicts",
                     "-n", NAMESPACE, "-f", "-", input=text)
    assert result.returncode == 0, result.stderr


def test_the_pods_meet_the_restricted_pod_security_standard(helm, cluster, unique):
    namespace = unique("pss")
    assert kubectl(cluster, "create", "namespace", namespace).returncode == 0
    assert kubectl(cluster, "label", "namespace", namespace,
                   "pod-security.kubernetes.io/enforce=restricted").returncode == 0
    for account in ("keyroom-operator", "keyroom-signer"):
        assert kubectl(cluster, "-n", namespace, "create", "serviceaccount", account).returncode == 0
    for name, deployment in by_kind(render(helm), "Deployment").items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
               "spec": deployment["spec"]["template"]["spec"]}
        result = kubectl(cluster, "create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
        assert result.returncode == 0, f"{name}: {result.stderr}"
    # the same check refuses a pod that runs as root: it is not vacuous
    pod["spec"] = {**pod["spec"], "securityContext": {**pod["spec"]["securityContext"], "runAsNonRoot": False}}
    result = kubectl(cluster, "create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
    assert result.returncode != 0 and "restricted" in result.stderr


def _secret(cluster, name: str) -> dict[str, bytes]:
    result = kubectl(cluster, "-n", NAMESPACE, "get", "secret", name, "-o", "json")
    assert result.returncode == 0, result.stderr
    return {key: base64.b64decode(value) for key, value in json.loads(result.stdout)["data"].items()}


def test_install_then_upgrade_keeps_the_generated_pins_and_tls(helm, cluster):
    # The control plane already holds the CRDs, policies and roles (applied from crds/, as a user who
    # installed them with kubectl would have): the release takes them over.
    run(helm, "install", "keyroom", str(CHART), "-n", NAMESPACE, "--take-ownership", cluster=cluster)
    pins = _secret(cluster, "keyroom-hsm-pin")
    assert len(pins["pin"]) == 32 and len(pins["so-pin"]) == 32 and pins["pin"] != pins["so-pin"]
    tls = _secret(cluster, "keyroom-signer-tls")
    serving = x509.load_pem_x509_certificate(tls["tls.crt"])
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"keyroom-signer.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    ca = x509.load_pem_x509_certificate(tls["ca.crt"])
    serving.verify_directly_issued_by(ca)

    run(helm, "upgrade", "keyroom", str(CHART), "-n", NAMESPACE, "--set", "signer.sessions=8", cluster=cluster)
    assert _secret(cluster, "keyroom-hsm-pin") == pins, "an upgrade must not change the token's PINs"
    assert _secret(cluster, "keyroom-signer-tls") == tls
    deployment = json.loads(kubectl(cluster, "-n", NAMESPACE, "get", "deployment", "keyroom-signer",
                                    "-o", "json").stdout)
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KEYROOM_SIGNER_SESSIONS"] == "8"
    history = json.loads(run(helm, "history", "keyroom", "-n", NAMESPACE, "-o", "json", cluster=cluster).stdout)
    assert [entry["status"] for entry in history] == ["superseded", "deployed"]
