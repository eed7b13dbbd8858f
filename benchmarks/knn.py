"""Weighted k-NN: our search (bf16-certified where the CPU multiplies bf16 natively, else faiss;
faiss timed too) against the reference's chunked dense matmul, same inputs.

    python -m benchmarks.knn --train 100000 --test 10000 --dim 384 --k 20

The reference (eval_knn.knn_classifier) multiplies 100-query chunks with the whole train matrix,
takes top-k and sums exp(sim/T) per class; it is re-implemented here only to time and to compare
predictions. Inputs: class centres plus Gaussian noise, L2-normalised. Prints one JSON line with
the times and the share of queries whose prediction equals the reference's.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.device import device_name
from stages.knn import knn_predict
from stages.knn_bf16 import MAX_DIM, MIN_DIM, has_native_bf16


def reference_knn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                  k: int, t: float, num_classes: int) -> np.ndarray:
    """The reference's predictions (eval_knn.knn_classifier's arithmetic), (N_test,)."""
    predictions, chunk = [], 100
    train_t = train.t()
    for start in range(0, test.shape[0], chunk):
        queries = test[start:start + chunk]
        sims, idx = (queries @ train_t).topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(queries.shape[0], -1).gather(1, idx)
        one_hot = torch.zeros(queries.shape[0] * k, num_classes).scatter_(1, candidates.view(-1, 1), 1)
        probs = (one_hot.view(queries.shape[0], -1, num_classes) * sims.div(t).exp().unsqueeze(-1)).sum(1)
        predictions.append(probs.argsort(1, descending=True)[:, 0])
    return torch.cat(predictions).numpy()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.knn")
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--noise", type=float, default=6.0, help="per-coordinate noise around the class centres")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
    train_labels = rng.integers(0, args.classes, args.train)
    test_labels = rng.integers(0, args.classes, args.test)
    train = centers[train_labels] + args.noise * rng.normal(size=(args.train, args.dim)).astype(np.float32)
    test = centers[test_labels] + args.noise * rng.normal(size=(args.test, args.dim)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)

    start = time.perf_counter()
    reference = reference_knn(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test),
                              args.k, 0.07, args.classes)
    reference_s = time.perf_counter() - start
    timed = {}
    for search in ("auto", "faiss"):
        start = time.perf_counter()
        timed[search] = knn_predict(train, train_labels, test, args.k, 0.07, args.classes, search=search)
        timed[search + "_s"] = time.perf_counter() - start
    ours, ours_s = timed["auto"], timed["auto_s"]
    result = {
        "benchmark": "knn",
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "config": vars(args),
        "search": "bf16" if has_native_bf16() and MIN_DIM <= args.dim <= MAX_DIM else "faiss",
        "seconds": ours_s,
        "reference_seconds": reference_s,
        "speedup": reference_s / ours_s,
        "predictions_equal_reference": float(np.mean(ours == reference)),
        "faiss_seconds": timed["faiss_s"],
        "faiss_predictions_equal_reference": float(np.mean(timed["faiss"] == reference)),
        "top1": 100.0 * float(np.mean(ours == test_labels)),
        "reference_top1": 100.0 * float(np.mean(reference == test_labels)),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
