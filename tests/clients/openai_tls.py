"""The official OpenAI Python SDK over HTTPS, trusting only the test's CA bundle.

Usage: python3 openai_tls.py BASE_URL MODEL CA_FILE API_KEY [CLIENT_CERT CLIENT_KEY]
Prints one JSON object; exits non-zero on any unexpected behaviour.
"""
import json
import sys

import openai

base_url, model, ca, api_key = sys.argv[1:5]
cert = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else None
http_client = openai.DefaultHttpxClient(verify=ca, cert=cert)
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, http_client=http_client)

completion = client.completions.create(model=model, prompt="The patient", max_tokens=4, temperature=0)
assert completion.choices[0].finish_reason in ("stop", "length"), completion
pieces = []
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True
)
for chunk in stream:
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")

# A client that does not trust the CA refuses the server.
untrusting = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
try:
    untrusting.models.list()
    refused = False
except openai.APIConnectionError:
    refused = True
assert refused, "a client without the test CA trusted the server"

wrong_key = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0, http_client=http_client)
try:
    wrong_key.models.list()
    status = 200
except openai.AuthenticationError as e:
    status = e.status_code

print(json.dumps({"completion": completion.choices[0].text, "streamed": "".join(pieces), "wrong_key": status}))
