"""Drives encoders with NVIDIA's Triton Python clients (tritonclient, installed by
scripts/setup.sh), as their users call a Triton server: HTTP with the client's defaults (binary
tensor data both ways), HTTP in plain JSON, and gRPC.
Usage: python3 triton_check.py HTTP_HOST:PORT GRPC_HOST:PORT MODEL DECODER TEXT...
Prints one JSON object: the model's metadata, each transport's output rows, and the error each
transport gives for DECODER."""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

http_url, grpc_url, model, decoder = sys.argv[1:5]
texts = np.array([t.encode() for t in sys.argv[5:]], dtype=np.object_)
report = {}


def http_rows(client, binary):
    inp = httpclient.InferInput("text_input", [len(texts)], "BYTES")
    inp.set_data_from_numpy(texts, binary_data=binary)
    meta = client.get_model_metadata(model)
    out = httpclient.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=binary)
    result = client.infer(model, [inp], outputs=[out])
    return result.as_numpy(meta["outputs"][0]["name"]).tolist()


def grpc_rows(client, name):
    inp = grpcclient.InferInput("text_input", [len(texts)], "BYTES")
    inp.set_data_from_numpy(texts)
    result = client.infer(name, [inp])
    output = result.get_response().outputs[0].name
    return result.as_numpy(output).tolist()


def failure(call):
    try:
        call()
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}
    return None


http = httpclient.InferenceServerClient(url=http_url)
report["live"] = http.is_server_live()
report["metadata"] = http.get_model_metadata(model)
report["http_binary"] = http_rows(http, True)
report["http_json"] = http_rows(http, False)
# No outputs named: the client asks for every output in binary.
inp = httpclient.InferInput("text_input", [len(texts)], "BYTES")
inp.set_data_from_numpy(texts)
result = http.infer(model, [inp])
report["http_default"] = result.as_numpy(report["metadata"]["outputs"][0]["name"]).tolist()

grpc = grpcclient.InferenceServerClient(url=grpc_url)
report["grpc"] = grpc_rows(grpc, model)

report["http_decoder"] = failure(lambda: http.infer(decoder, [inp]))
report["grpc_wrong_type"] = failure(
    lambda: grpc.infer(model, [grpcclient.InferInput("text_input", [1], "FP32").set_data_from_numpy(np.ones(1, np.float32))])
)
print(json.dumps(report))
