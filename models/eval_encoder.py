"""Scores a served encoder student on held-out JSONL over the wire, as a client sees it:
sequence classifiers through POST /predict (accuracy of the best label), token classifiers
through POST /v1/classify with aggregation "simple" (entity-level precision/recall/F1, exact
character span and type). Standard library only.
Usage: python3 eval_encoder.py HOST:PORT MODEL HELDOUT.jsonl
Prints one JSON object."""
import json
import sys
import urllib.request

addr, model, path = sys.argv[1:4]
texts = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def post(route, body):
    req = urllib.request.Request(
        f"http://{addr}{route}", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


report = {"model": model, "texts": len(texts)}
batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]
if "entities" in texts[0]:
    hit = predicted = gold = 0
    for batch in batches:
        answer = post("/v1/classify", {"model": model, "input": [t["text"] for t in batch]})
        for t, row in zip(batch, answer["data"]):
            want = {(e["start"], e["end"], e["label"]) for e in t["entities"]}
            got = {(e["start"], e["end"], e["entity_group"]) for e in row["entities"]}
            hit, predicted, gold = hit + len(want & got), predicted + len(got), gold + len(want)
    p, r = hit / max(predicted, 1), hit / max(gold, 1)
    report.update(precision=p, recall=r, micro_f1=2 * p * r / (p + r) if p + r else 0.0, entities=gold)
else:
    right = 0
    for batch in batches:
        answer = post("/predict", {"model": model, "inputs": [t["text"] for t in batch], "top_k": 1})
        right += sum(row[0]["label"] == t["label"] for t, row in zip(batch, answer))
    report["accuracy"] = right / len(texts)
print(json.dumps(report))
