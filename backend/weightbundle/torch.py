"""From a PyTorch trainer to a served bundle (optional: ``pip install weightbundle[torch]``).

>>> from weightbundle.torch import export, state_dict               # doctest: +SKIP
>>> export(model, (x,), "model.onnx")                              # names and layouts kept
>>> wb.save_bundle("model.bundle", wb.build_bundle(wb.convert("model.onnx", checkpoint=state_dict(model))))
>>> client.update(state_dict(model), via="shm")                    # after each optimizer step

``export`` uses the flags hoisting needs: the dynamo exporter with ``optimize=False``
keeps every parameter under its state_dict name and in the trainer's layout, and
leaves the weight preprocessing (Transpose, Slice...) in the graph, where
``weightbundle.convert`` hoists it into the update graph.  Without onnxscript it
falls back to the TorchScript exporter with ``do_constant_folding=False``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np


def export(
    module: Any,
    example_args: Sequence[Any],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    dynamo: bool | None = None,
) -> str:
    """Export ``module`` (in eval mode) to ONNX at ``path`` so a bundle can refresh every parameter."""
    import torch

    path = os.fspath(path)
    args = tuple(example_args)
    names = list(input_names or [f"input_{i}" if len(args) > 1 else "x" for i in range(len(args))])
    outs = list(output_names or ["y"])
    if dynamo is None:
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)

            dynamo = True
        except ImportError:
            dynamo = False
    was_training = module.training
    module.eval()
    try:
        if dynamo:
            shapes = tuple({0: torch.export.Dim("batch")} if dynamic_batch and int(getattr(a, "ndim", 0)) else None for a in args)
            torch.onnx.export(
                module,
                args,
                path,
                input_names=names,
                output_names=outs,
                dynamo=True,
                optimize=False,
                external_data=False,
                dynamic_shapes=shapes if dynamic_batch else None,
            )
        else:
            axes = {n: {0: "batch"} for n in names + outs} if dynamic_batch else None
            torch.onnx.export(module, args, path, input_names=names, output_names=outs, dynamo=False, do_constant_folding=False, dynamic_axes=axes)
    finally:
        module.train(was_training)
    return path


def state_dict(module: Any) -> dict[str, np.ndarray]:
    """``module.state_dict()`` as numpy arrays without copies.

    Tied parameters stay one array under both names (shared memory), which is how
    ``convert(checkpoint=...)`` recognises them; BF16 tensors become ``ml_dtypes.bfloat16``.
    """
    from .checkpoint import to_numpy

    return to_numpy(module.state_dict(keep_vars=False))
