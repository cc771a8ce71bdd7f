#!/usr/bin/env python3
"""Build the example model repository reproducibly (fixed seeds, no downloads).

model_repository/mlp/1/model.bundle is a small scorer MLP (16 -> 64 -> 64 -> 4):
the kind of model an online-learning or RL team retrains and pushes every few
minutes.  config.pbtxt is regenerated from the bundle so the two always agree.

    python tools/make_example.py [--repo model_repository]
"""

from __future__ import annotations

import argparse
import os
import sys

import onnx

import weightbundle as wb
from weightbundle import zoo
from weightbundle.modelconfig import make_config

SIZES = (16, 64, 64, 4)


def example_model(seed: int = 0) -> onnx.ModelProto:
    return zoo.mlp(SIZES, seed, input_name="features", output_name="scores", name="scorer")


# The example enables updates; the secret comes from this environment variable (never the config).
PARAMETERS = {"allow_updates": "true", "update_secret_env": "WEIGHTBUNDLE_SECRET", "history": "2"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model_repository"))
    p.add_argument("--name", default="mlp")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--instances", type=int, default=1)
    a = p.parse_args(argv)
    model_dir = os.path.join(a.repo, a.name)
    os.makedirs(os.path.join(model_dir, "1"), exist_ok=True)
    path = os.path.join(model_dir, "1", "model.bundle")
    wb.save_bundle(path, wb.build_bundle(wb.convert(example_model())))
    with wb.Bundle.load_from_file(path) as b:
        text = make_config(b, a.name, a.max_batch_size, a.instances, parameters=PARAMETERS)
    with open(os.path.join(model_dir, "config.pbtxt"), "w") as f:
        f.write(text)
    print(f"example model ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
