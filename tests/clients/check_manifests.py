"""Checks what the Kubernetes schemas cannot: the ServiceMonitor (a Prometheus Operator custom
resource, against the fields its CRD defines: a small schema of our own) selects the Service
and names one of its ports; the GPU Deployment asks for a GPU on a T4 node, runs the CUDA image
on a GPU provider, and otherwise matches the CPU one (name, labels, probes, security).
Usage: python3 check_manifests.py KUBERNETES_FOLDER
Prints "ok" or the faults, one a line; exits non-zero on any fault."""
import copy
import os
import sys

import yaml

from schema_check import finish, keys, need


folder = sys.argv[1]


def load(name):
    with open(os.path.join(folder, name)) as f:
        return yaml.safe_load(f)


service = load("service.yaml")
monitor = load("servicemonitor.yaml")
keys(monitor, "ServiceMonitor", {"apiVersion", "kind", "metadata", "spec"}, ("apiVersion", "kind", "metadata", "spec"))
need(monitor.get("apiVersion") == "monitoring.coreos.com/v1", "ServiceMonitor: apiVersion")
need(monitor.get("kind") == "ServiceMonitor", "ServiceMonitor: kind")
keys(monitor.get("metadata"), "ServiceMonitor.metadata", {"name", "namespace", "labels", "annotations"}, ("name",))
spec = keys(
    monitor.get("spec"),
    "ServiceMonitor.spec",
    {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels",
     "sampleLimit", "scrapeProtocols", "attachMetadata"},
    ("selector", "endpoints"),
)
selector = keys(spec.get("selector"), "spec.selector", {"matchLabels", "matchExpressions"})
labels = service.get("metadata", {}).get("labels", {})
for k, v in (selector.get("matchLabels") or {}).items():
    need(labels.get(k) == v, f"the ServiceMonitor selects {k}={v}, which the Service lacks")
port_names = {p.get("name") for p in service.get("spec", {}).get("ports", [])}
endpoints = spec.get("endpoints") or []
need(len(endpoints) >= 1, "the ServiceMonitor has no endpoint")
for i, e in enumerate(endpoints):
    keys(e, f"endpoints[{i}]",
         {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "authorization",
          "basicAuth", "bearerTokenSecret", "tlsConfig", "relabelings", "metricRelabelings", "params",
          "followRedirects", "enableHttp2"})
    need(e.get("port") in port_names, f"endpoints[{i}] names port {e.get('port')!r}, not one of the Service's")
    need(e.get("path", "/metrics") == "/metrics", f"endpoints[{i}]: the server's metrics are at /metrics")

cpu = load("deployment.yaml")
gpu = load("gpu/deployment.yaml")
need(gpu["metadata"] == cpu["metadata"], "the GPU Deployment must keep the CPU one's name and labels")
need(gpu["spec"]["selector"] == cpu["spec"]["selector"], "the GPU Deployment must select the same pods")
pod = gpu["spec"]["template"]["spec"]
need((pod.get("nodeSelector") or {}).get("nvidia.com/gpu.product") == "Tesla-T4", "a T4 node selector")
need(any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or []), "a toleration of nvidia.com/gpu")
(container,) = pod["containers"]
resources = container.get("resources", {})
need(str(resources.get("limits", {}).get("nvidia.com/gpu")) == "1", "limits nvidia.com/gpu: 1")
need(container.get("image", "").endswith("-cuda"), "the GPU Deployment runs the CUDA image")
env = {e["name"]: e.get("value") for e in container.get("env", [])}
need(env.get("DISTILL_SERVE_EXECUTION_PROVIDER") in ("cuda", "tensorrt"), "a GPU execution provider")
(cpu_container,) = cpu["spec"]["template"]["spec"]["containers"]
for field in ("readinessProbe", "livenessProbe", "lifecycle", "securityContext", "ports", "volumeMounts", "args"):
    need(container.get(field) == cpu_container.get(field), f"the GPU container's {field} differs from the CPU one's")
need(container["startupProbe"]["httpGet"] == cpu_container["startupProbe"]["httpGet"], "startupProbe")
same = copy.deepcopy(pod)
for field in ("nodeSelector", "tolerations", "containers"):
    same.pop(field, None)
cpu_pod = copy.deepcopy(cpu["spec"]["template"]["spec"])
cpu_pod.pop("containers")
need(same == cpu_pod, "the GPU pod differs from the CPU pod beyond GPU placement")

finish()
