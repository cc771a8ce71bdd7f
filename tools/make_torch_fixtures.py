"""Write the PyTorch fixtures under tests/fixtures/torch/ (needs torch; CI never runs this).

    .venv/bin/pip install torch==2.13.0 onnxscript   # CPU wheel; plain `pip install torch` pulls CUDA
    .venv/bin/python tools/make_torch_fixtures.py

For each of four small models (seeded, so the output is reproducible on one torch build):
- ``<model>.<exporter>.onnx`` for the TorchScript exporter (``ts``, default flags: constant
  folding on), ``ts_nofold`` (``do_constant_folding=False``), dynamo (``dynamo``, default
  flags) and dynamo ``optimize=False`` (``dynamo_noopt``);
- ``<model>.before.safetensors``: the state_dict the models were exported from;
- ``<model>.after.safetensors``: the state_dict after 3 SGD steps;
- ``<model>.io.safetensors``: an input ``x`` and torch's outputs ``y_before`` / ``y_after``
  (eval mode) for both state_dicts.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "torch")


class MLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class ConvNet(nn.Module):
    """Two Conv+BatchNorm2d blocks (one conv without bias), global pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class Transformer(nn.Module):
    """Embedding, one TransformerEncoderLayer (fused in_proj), LayerNorm, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.enc(self.emb(x))))


class Tied(nn.Module):
    """A tiny language model whose output projection is the embedding (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.fc = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 40, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.fc(self.emb(x))))


def _example(name: str, g: torch.Generator) -> torch.Tensor:
    if name == "mlp":
        return torch.randn(4, 12, generator=g)
    if name == "convnet":
        return torch.randn(2, 3, 8, 8, generator=g)
    vocab = 30 if name == "transformer" else 40
    return torch.randint(0, vocab, (2, 7), generator=g)


MODELS = {"mlp": MLP, "convnet": ConvNet, "transformer": Transformer, "tied": Tied}
EXPORTS = {
    "ts": dict(dynamo=False),
    "ts_nofold": dict(dynamo=False, do_constant_folding=False),
    "dynamo": dict(dynamo=True),
    "dynamo_noopt": dict(dynamo=True, optimize=False),
}


def _state(m: nn.Module) -> dict[str, np.ndarray]:
    # A copy per name: safetensors refuses tensors that share memory (tied weights).
    return {k: v.detach().cpu().numpy().copy() for k, v in m.state_dict().items()}


def _randomize_bn(m: nn.Module, g: torch.Generator) -> None:
    """Non-trivial running statistics and affine params, as a trained model has."""
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _train(m: nn.Module, name: str, g: torch.Generator, steps: int = 3) -> None:
    """3 SGD steps in train mode (BatchNorm statistics move too), then eval."""
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    for _ in range(steps):
        x = _example(name, g)
        if name == "mlp":
            x = torch.randn(16, 12, generator=g)
        loss = m(x).float().pow(2).mean() + sum((p - 0.3).pow(2).sum() for p in m.parameters()) * 0.05
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    warnings.filterwarnings("ignore")
    summary = {}
    for name, cls in MODELS.items():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1234)
        m = cls()
        with torch.no_grad():
            _randomize_bn(m, g)
        m.eval()
        x = _example(name, g)
        before = _state(m)
        with torch.no_grad():
            y_before = m(x).numpy()
        for tag, kw in EXPORTS.items():
            path = os.path.join(OUT, f"{name}.{tag}.onnx")
            dyn = {"x": {0: "batch"}}
            if kw.get("dynamo"):
                torch.onnx.export(
                    m,
                    (x,),
                    path,
                    input_names=["x"],
                    output_names=["y"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    external_data=False,
                    verbose=False,
                    **{k: v for k, v in kw.items()},
                )
            else:
                torch.onnx.export(m, (x,), path, input_names=["x"], output_names=["y"], dynamic_axes=dyn, **kw)
            for f in os.listdir(OUT):  # the dynamo exporter may leave a .data file: keep everything in one file
                if f.startswith(f"{name}.{tag}.onnx.") and f.endswith(".data"):
                    os.unlink(os.path.join(OUT, f))
        _train(m, name, g)
        after = _state(m)
        with torch.no_grad():
            y_after = m(x).numpy()
        save_file(before, os.path.join(OUT, f"{name}.before.safetensors"))
        save_file(after, os.path.join(OUT, f"{name}.after.safetensors"))
        save_file({"x": x.numpy(), "y_before": y_before, "y_after": y_after}, os.path.join(OUT, f"{name}.io.safetensors"))
        summary[name] = {"params": len(before), "max_change": float(max(np.abs(after[k].astype(np.float64) - before[k]).max() for k in before))}
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "Written by tools/make_torch_fixtures.py with torch "
            + torch.__version__.split("+")[0]
            + ". Do not edit; run the script again.\n\n```\n"
            + json.dumps(summary, indent=1)
            + "\n```\n"
        )
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total / 1024:.0f} KiB, to {os.path.normpath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
