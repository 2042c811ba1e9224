"""Turn a training run's output into the pipeline folder that ships in the package (`--model proxy`).

    python -m hetcache.proxy.export TRAINED_DIR [--out src/hetcache/data/proxy]

The trained VAE and transformer join the text encoder, tokenizer and scheduler that `build_proxy_pipeline` makes
from code with the run's seed, and everything is written by `save_pretrained`, so the package loads it through
the ordinary `from_pretrained` path. The VAE and transformer are stored in float16 (half the bytes; loading casts
them back); the 73 KB text encoder stays float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from hetcache.pipeline import proxy_folder
from hetcache.proxy.architecture import build_proxy_pipeline
from hetcache.proxy.train import load_trained


def export_proxy(trained: Path, out: Path) -> None:
    """Write the complete proxy pipeline folder for the run in `trained` to `out` (replaced as a whole)."""
    if not (trained / "transformer").is_dir():
        raise SystemExit(f"{trained} holds no trained transformer: export a run that trained one")
    seed = json.loads((trained / "train_log.json").read_text())["config"]["seed"]
    pipe = build_proxy_pipeline(seed)
    load_trained(pipe, trained)
    for model in (pipe.vae, pipe.transformer):
        model.to(torch.float16)
        model.register_to_config(_name_or_path="proxy")  # not the training machine's path
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:
        pipe.save_pretrained(staging)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(staging, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trained", type=Path, help="output folder of hetcache.proxy.train")
    parser.add_argument("--out", type=Path, default=proxy_folder())
    args = parser.parse_args(argv)
    export_proxy(args.trained, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
