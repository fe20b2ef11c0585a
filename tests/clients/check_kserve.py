"""Checks docker/kserve/*.yaml against the fields KServe's CRDs define for them (a small
schema of our own: allowed and required keys, types, and what the distill-serve runtime
needs). Usage: python3 check_kserve.py SERVINGRUNTIME INFERENCESERVICE
Prints "ok" or the faults, one a line; exits non-zero on any fault."""
import sys

import yaml

from schema_check import finish, keys, need


runtime_file, service_file = sys.argv[1], sys.argv[2]
rt = yaml.safe_load(open(runtime_file))
keys(rt, "ServingRuntime", {"apiVersion", "kind", "metadata", "spec"}, ("apiVersion", "kind", "metadata", "spec"))
need(rt.get("apiVersion") == "serving.kserve.io/v1alpha1", "ServingRuntime: apiVersion")
need(rt.get("kind") == "ServingRuntime", "ServingRuntime: kind")
meta = keys(rt.get("metadata"), "ServingRuntime.metadata", {"name", "namespace", "annotations", "labels"}, ("name",))
ann = meta.get("annotations") or {}
need(ann.get("prometheus.kserve.io/port") == "8080", "annotation prometheus.kserve.io/port must be \"8080\"")
need(ann.get("prometheus.kserve.io/path") == "/metrics", "annotation prometheus.kserve.io/path must be /metrics")
spec = keys(
    rt.get("spec"),
    "ServingRuntime.spec",
    {"supportedModelFormats", "protocolVersions", "containers", "multiModel", "disabled", "grpcEndpoint",
     "grpcDataEndpoint", "httpDataEndpoint", "replicas", "storageHelper", "builtInAdapter", "volumes",
     "nodeSelector", "affinity", "tolerations", "labels", "annotations", "imagePullSecrets"},
    ("supportedModelFormats", "containers"),
)
formats = spec.get("supportedModelFormats") or []
for i, f in enumerate(formats):
    keys(f, f"supportedModelFormats[{i}]", {"name", "version", "autoSelect", "priority"}, ("name",))
need(any(f.get("name") == "onnx" for f in formats), "supportedModelFormats must hold onnx")
versions = spec.get("protocolVersions") or []
need(set(versions) <= {"v1", "v2", "grpc-v1", "grpc-v2"}, f"protocolVersions: unknown {versions}")
need({"v2", "grpc-v2"} <= set(versions), "protocolVersions must hold v2 and grpc-v2")
containers = spec.get("containers") or []
need(len(containers) >= 1 and containers[0].get("name") == "kserve-container",
     "the first container must be named kserve-container")
if containers:
    c = containers[0]
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    need(ports.get("http1") == 8080, "port http1 8080 (HTTP)")
    need(ports.get("h2c") == 8081, "port h2c 8081 (gRPC over cleartext HTTP/2)")
    env = {e.get("name"): e.get("value") for e in c.get("env", [])}
    need(env.get("DISTILL_SERVE_MODEL_REPOSITORY") == "/mnt/models", "the repository must be /mnt/models")
    need(env.get("DISTILL_SERVE_HTTP_ADDR", "").startswith("0.0.0.0:"), "HTTP must listen on 0.0.0.0")
    need(env.get("DISTILL_SERVE_GRPC_ADDR", "").startswith("0.0.0.0:"), "gRPC must listen on 0.0.0.0")
    need(not env.get("DISTILL_SERVE_STORE", "/mnt/models").startswith("/mnt/models"),
         "the store must not be under the read-only /mnt/models")

isvc = yaml.safe_load(open(service_file))
keys(isvc, "InferenceService", {"apiVersion", "kind", "metadata", "spec"}, ("apiVersion", "kind", "metadata", "spec"))
need(isvc.get("apiVersion") == "serving.kserve.io/v1beta1", "InferenceService: apiVersion")
need(isvc.get("kind") == "InferenceService", "InferenceService: kind")
imeta = keys(isvc.get("metadata"), "InferenceService.metadata", {"name", "namespace", "annotations", "labels"}, ("name",))
need((imeta.get("annotations") or {}).get("serving.kserve.io/deploymentMode") == "RawDeployment",
     "deploymentMode must be RawDeployment (Serverless allows one port)")
ispec = keys(isvc.get("spec"), "InferenceService.spec", {"predictor", "transformer", "explainer"}, ("predictor",))
pred = keys(ispec.get("predictor"), "spec.predictor",
            {"model", "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "serviceAccountName",
             "nodeSelector", "tolerations", "affinity", "volumes", "containerConcurrency", "timeout"},
            ("model",))
model = keys(pred.get("model"), "spec.predictor.model",
             {"modelFormat", "runtime", "protocolVersion", "storageUri", "resources", "env", "args"},
             ("modelFormat", "storageUri"))
need((model.get("modelFormat") or {}).get("name") == "onnx", "modelFormat onnx")
need(model.get("runtime") == meta.get("name"), "the predictor must name the runtime")
need(model.get("protocolVersion") in ("v1", "v2", "grpc-v2"), "protocolVersion")
need(isinstance(model.get("storageUri"), str) and "://" in model.get("storageUri", ""), "storageUri must be a URI")

finish()
