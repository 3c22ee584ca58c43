"""The backbone as an ONNX graph, for the ONNX Runtime and OpenVINO runtimes.

torch.export archives go through the dynamo exporter (it keeps their dynamic batch axis);
TorchScript and eager modules through the TorchScript-based one, with the batch axis marked
dynamic. The graph is exported once per model digest and kept in the store (Store.onnx_graph),
so a changed model never reuses another's graph; a graph the user ships (model.toml `onnx`)
is used as it is. Either way `runtimes.choose_runtime` checks its features against torch's.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from spurguard.server.errors import InvalidInput, exception_line

INPUT_NAME, OUTPUT_NAME = "input", "features"
OPSET = 18


_CHATTY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters log every optimisation pass and warn about optional packages (torchvision)
    and deprecations on every call; a server log needs none of it."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(source: torch.nn.Module | torch.export.ExportedProgram, path: Path, input_size: int) -> None:
    """Write `source` (features [N,d] of [N,3,S,S]) to `path` as ONNX with a dynamic batch axis."""
    if isinstance(source, torch.export.ExportedProgram):
        device = next((t.device for t in source.state_dict.values()), torch.device("cpu"))
    else:
        device = next((p.device for p in source.parameters()), torch.device("cpu"))
    example = torch.zeros(2, 3, input_size, input_size, device=device)
    try:
        with _quiet(), torch.inference_mode(False), torch.no_grad():
            if isinstance(source, torch.export.ExportedProgram):
                program = torch.onnx.export(source, (example,), dynamo=True, opset_version=OPSET, verbose=False)
                assert program is not None
                program.save(str(path))
            else:
                torch.onnx.export(
                    source, (example,), str(path), dynamo=False, opset_version=OPSET,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                )
    except Exception as error:  # noqa: BLE001 - the exporters raise many error types for unsupported graphs
        raise InvalidInput(
            f"the backbone cannot be exported to ONNX ({exception_line(error)}); ship one as model.toml "
            "`onnx`, or use runtime torch"
        ) from None
