"""What GitOps tools make of keyroom objects, computed by the tools' own libraries.

- kstatus (``sigs.k8s.io/cli-utils/pkg/kstatus``, as ``kubectl wait``-style
  tools, Flux and Argo CD's kstatus users read it): ``tests/kstatus/`` is a
  small Go program on the pinned library, built once per machine into the
  cache (keyed by the hash of its sources, like helm) and fed objects as JSON.
- Argo CD: the shipped Lua health scripts (``charts/keyroom/health/*.lua``) run
  in a real Lua interpreter (lupa), with ``obj`` set as Argo CD sets it.
- Flux: the shipped ``healthCheckExprs`` evaluated with cel-python, each
  expression seeing the object's top-level fields as variables, as Flux does.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess

import yaml

from keyroom.devenv.binaries import cache_root

REPO = pathlib.Path(__file__).resolve().parent.parent
KSTATUS_DIR = REPO / "tests" / "kstatus"
HEALTH_DIR = REPO / "charts" / "keyroom" / "health"
KINDS = ["SigningKey", "Certificate", "SigningPolicy", "SignRequest"]
#: how the three tools name the same verdict
ARGO_FOR_KSTATUS = {"Current": "Healthy", "InProgress": "Progressing", "Failed": "Degraded"}


def kstatus_binary() -> pathlib.Path:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((KSTATUS_DIR / name).read_bytes())
    target = cache_root() / "bin" / f"kstatus-{digest.hexdigest()[:12]}" / "kstatus"
    if target.exists():
        return target
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("Go is needed to build tests/kstatus (sigs.k8s.io/cli-utils' kstatus)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".kstatus-{os.getpid()}"
    subprocess.run([go, "build", "-trimpath", "-o", str(staging), "."], cwd=KSTATUS_DIR, check=True,
                   env=dict(os.environ, CGO_ENABLED="0"), capture_output=True, text=True, timeout=900)
    os.replace(staging, target)
    return target


def kstatus(objects: list[dict]) -> list[dict]:
    """kstatus's verdict (status, message) for each object, in order."""
    result = subprocess.run([str(kstatus_binary())], input=json.dumps(objects), capture_output=True, text=True,
                            check=True, timeout=60)
    return json.loads(result.stdout)


def lua_script(kind: str) -> str:
    return (HEALTH_DIR / f"{kind.lower()}.lua").read_text()


def argo_health(obj: dict) -> dict:
    """Argo CD's health of ``obj`` by the shipped script for its kind: {'status': ..., 'message': ...}."""
    import lupa

    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(json.loads(json.dumps(obj)), recursive=True)
    verdict = lua.execute(lua_script(obj["kind"]))
    return {"status": verdict["status"], "message": verdict["message"]}


def flux_expressions() -> dict[str, dict]:
    entries = yaml.safe_load((HEALTH_DIR / "flux-healthcheckexprs.yaml").read_text())
    return {entry["kind"]: entry for entry in entries}


def flux_health(obj: dict) -> str:
    """Flux's verdict from the shipped healthCheckExprs: the one expression that holds (they exclude each other).

    An expression that cannot be evaluated (an object without status) leaves Flux waiting: InProgress.
    """
    import celpy

    entry = flux_expressions()[obj["kind"]]
    environment = celpy.Environment()
    activation = {key: celpy.json_to_cel(value) for key, value in obj.items()}
    holding = []
    for verdict, field in (("InProgress", "inProgress"), ("Failed", "failed"), ("Current", "current")):
        program = environment.program(environment.compile(entry[field]))
        try:
            value = program.evaluate(activation)
        except celpy.CELEvalError:
            return "InProgress"
        if isinstance(value, celpy.CELEvalError):
            return "InProgress"
        if bool(value):
            holding.append(verdict)
    assert len(holding) <= 1, f"the healthCheckExprs of {obj['kind']} overlap: {holding} hold at once"
    return holding[0] if holding else "InProgress"


def verdicts(objects: list[dict]) -> list[tuple[str, str, str]]:
    """(kstatus, Argo CD, Flux) for each object."""
    return [(k["status"], argo_health(obj)["status"], flux_health(obj))
            for k, obj in zip(kstatus(objects), objects)]
