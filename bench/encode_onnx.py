"""Encoding speed, issue 15 part 6: all-MiniLM-L6-v2 through ONNX Runtime (graph optimisations on)
vs retroflow's fused encoder, one thread each, the same 300 SciFact passages, alternating trials.

ONNX Runtime is not a retroflow dependency (it and `onnx` would also pull a newer protobuf than the
pinned stack has), so install them apart and put them on the path for this run only:

    pip install --target /tmp/ortpkgs onnxruntime onnx && rm -rf /tmp/ortpkgs/numpy*
    PYTHONPATH=/tmp/ortpkgs OMP_NUM_THREADS=1 python bench/encode_onnx.py

Writes bench/results/encode_onnx.json.
"""

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)
import onnxruntime as ort  # noqa: E402 (after the thread count, which it reads at import)
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from retrieval.serving.encoder import Encoder, EncoderSettings  # noqa: E402
from retroflow.models import resolve_model_path  # noqa: E402

path = resolve_model_path("minilm")
rows = [json.loads(line) for line in open(REPO.parent / "shared" / "data" / "scifact" / "corpus.jsonl")]
random.Random(0).shuffle(rows)
texts = [(r["title"] + " " + r["text"]).strip() for r in rows[:300]]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()
onnx_path = "/tmp/minilm.onnx"
if not Path(onnx_path).exists():
    dummy = tok(["hello world"] * 2, return_tensors="pt", padding=True)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.onnx.export(
        Wrap(model),
        (dummy["input_ids"], dummy["attention_mask"]),
        onnx_path,
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": {0: "b", 1: "l"}, "attention_mask": {0: "b", 1: "l"}, "last_hidden_state": {0: "b", 1: "l"}},
        opset_version=17,
        dynamo=False,
    )
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])


def ort_encode(texts, bs=64):
    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), 384), np.float32)
    for i in range(0, len(texts), bs):
        idx = order[i : i + bs]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=256, return_tensors="np")
        h = sess.run(None, {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
        m = enc["attention_mask"][..., None]
        v = (h * m).sum(1) / m.sum(1)
        out[idx] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


enc = Encoder(path, EncoderSettings(show_progress=False, passage_max_length=256))
times = {"retroflow": [], "onnxruntime": []}
for _ in range(3):
    t = time.perf_counter()
    a = enc.encode_passages(texts)
    times["retroflow"].append(time.perf_counter() - t)
    t = time.perf_counter()
    b = ort_encode(texts)
    times["onnxruntime"].append(time.perf_counter() - t)
dev = float(np.max(1 - np.sum(a * b, axis=1)))
med = {k: statistics.median(v) for k, v in times.items()}
result = {
    "docs": len(texts),
    "median_s": med,
    "docs_per_s": {k: len(texts) / v for k, v in med.items()},
    "onnx_over_retroflow": med["retroflow"] / med["onnxruntime"],
    "max_1_minus_cos": dev,
    "onnxruntime": ort.__version__,
    "threads": 1,
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip(),
}
out = REPO / "bench" / "results" / "encode_onnx.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(result, indent=2))
print(json.dumps(result))
