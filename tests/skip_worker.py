"""Run by tests/test_fault_tolerance.py under `accelerate launch`: trains the config in
argv[1] (JSON) with the train split's third batch made all NaN on rank 1 only (argv[2]
"nan") or dropped on every rank ("drop")."""

import json
import sys
from pathlib import Path

import torch

import dist_seg.data.stream as stream
from dist_seg.config import load_config
from dist_seg.train import Trainer


def main() -> None:
    mode, real = sys.argv[2], stream.EpochLoader.__iter__

    def batches(self):
        rank = self.stream.rank
        for i, batch in enumerate(real(self)):
            if self.stream.train and i == 2:
                if mode == "drop":
                    continue
                if rank == 1:
                    batch = {**batch, "image": torch.full(batch["image"].shape, float("nan"))}
            yield batch

    stream.EpochLoader.__iter__ = batches
    Trainer(load_config(None, [json.loads(Path(sys.argv[1]).read_text())])).fit()


if __name__ == "__main__":  # loader workers start through a forkserver, which imports this
    main()
