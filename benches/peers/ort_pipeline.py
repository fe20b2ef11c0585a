"""The Python pipeline users write around ONNX Runtime for an encoder, as Hugging Face
optimum's ORTModelForSequenceClassification + pipeline(batch_size=32) run it: the fast
tokenizer pads each batch of 32 texts to its longest, one InferenceSession.run per batch,
softmax on the logits. Same model file, same texts, arrival order; no HTTP.
Usage: python3 ort_pipeline.py MODEL_DIR TEXTS.json THREADS
Prints {"sequences_per_s": ..., "padding_share": ...}."""
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

model_dir, texts_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
texts = json.load(open(texts_file, encoding="utf-8"))
tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tokenizer.enable_padding(pad_id=0)
options = ort.SessionOptions()
options.intra_op_num_threads = threads
session = ort.InferenceSession(f"{model_dir}/model.onnx", options, providers=["CPUExecutionProvider"])
names = {i.name for i in session.get_inputs()}

real = computed = 0
started = time.perf_counter()
for i in range(0, len(texts), 32):
    encodings = tokenizer.encode_batch(texts[i : i + 32])
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    logits = session.run(None, feed)[0]
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = exp / exp.sum(axis=-1, keepdims=True)
    real += int(mask.sum())
    computed += mask.size
elapsed = time.perf_counter() - started
print(json.dumps({"sequences_per_s": len(texts) / elapsed, "padding_share": 1 - real / computed}))
