"""Talks to a running distill-serve with the official OpenAI Python SDK, as a user would.

Usage: python3 openai_check.py BASE_URL MODEL
Prints one JSON object with what the SDK saw; exits non-zero on any unexpected behaviour.
"""
import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

models = [m.id for m in client.models.list()]
assert model in models, models

completion = client.completions.create(model=model, prompt="The patient", max_tokens=8, temperature=0)
assert completion.choices[0].finish_reason in ("stop", "length"), completion
assert completion.usage.completion_tokens >= 1

messages = [{"role": "user", "content": "What is the ICD-10-CM code for essential hypertension?"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, seed=1)
text = chat.choices[0].message.content
assert chat.choices[0].message.role == "assistant"

pieces = []
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, seed=1, stream=True,
    stream_options={"include_usage": True},
)
usage = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
assert "".join(pieces) == text, ("".join(pieces), text)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

with_logprobs = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
)
assert len(with_logprobs.choices[0].logprobs.content) == 4
assert len(with_logprobs.choices[0].logprobs.content[0].top_logprobs) == 2

errors = {}
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
except openai.NotFoundError as e:
    errors["not_found"] = e.status_code
try:
    client.completions.create(model=model, prompt="x", max_tokens=0)
except openai.BadRequestError as e:
    errors["bad_request"] = e.status_code
assert errors == {"not_found": 404, "bad_request": 400}, errors

print(json.dumps({"chat": text, "completion": completion.choices[0].text, "errors": errors}))
