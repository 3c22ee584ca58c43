"""A real Triton Inference Server (PyTriton) that serves an ONNX backbone, for the [triton] tests.

Runs with the interpreter of .venv-triton (PyTriton needs numpy<2; see the Makefile's
triton-venv), never inside the test process: tritonserver 2.51 as PyTriton bundles it has only
the python backend, so the model is a Python function that runs the graph in ONNX Runtime,
behind Triton's dynamic batcher. Prints READY once the model is served; stops on SIGTERM.
With PKI (a folder of pki_support.make_pki) its gRPC port speaks mutual TLS only: server.pem
for 127.0.0.1, clients need a certificate signed by ca.pem.

    python triton_server.py GRAPH MODEL_NAME GRPC_PORT HTTP_PORT [PKI]
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main(graph: str, model: str, grpc_port: int, http_port: int, pki: Path | None) -> None:
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    _, channels, height, width = graph_input.shape
    feature_dim = graph_output.shape[1]

    @batch
    def infer(images: np.ndarray) -> dict[str, np.ndarray]:
        return {"features": session.run(None, {graph_input.name: images})[0]}

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tls = {} if pki is None else {
        "grpc_use_ssl": True, "grpc_use_ssl_mutual": True, "grpc_server_cert": pki / "server.pem",
        "grpc_server_key": pki / "server.key", "grpc_root_cert": pki / "ca.pem",
    }
    config = TritonConfig(
        grpc_address="127.0.0.1", grpc_port=grpc_port, http_address="127.0.0.1", http_port=http_port,
        allow_metrics=False, **tls,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=model,
            infer_func=infer,
            inputs=[Tensor(name="images", dtype=np.float32, shape=(channels, height, width))],
            outputs=[Tensor(name="features", dtype=np.float32, shape=(feature_dim,))],
            config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=1000)),
        )
        triton.run()
        print("READY", flush=True)
        stop.wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]) if len(sys.argv) > 5 else None)
