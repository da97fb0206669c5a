"""One way for keyroom's processes to reach the API server: in-cluster credentials, else the kubeconfig."""
from __future__ import annotations

import functools

import kubernetes


@functools.cache
def api_client() -> kubernetes.client.ApiClient:
    """A shared client: the pod's ServiceAccount in a cluster, ``$KUBECONFIG`` (or ~/.kube/config) outside."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)
