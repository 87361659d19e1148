"""Run by tests/test_no_sync.py under `accelerate launch`: trains the config in argv[1]
(JSON) counting host syncs in every rank's steady-state steps, and writes what each rank
found to argv[2]/rank-R.json."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sync_counter import counting_steps  # noqa: E402

from dist_seg.config import load_config  # noqa: E402
from dist_seg.train import Trainer  # noqa: E402


def main() -> None:
    found: list[str] = []
    Trainer.train_step = counting_steps(Trainer, found)
    trainer = Trainer(load_config(None, [json.loads(Path(sys.argv[1]).read_text())]))
    rank = trainer.rank
    trainer.fit()
    steps = len(Trainer.train_step.calls) - 2
    out = Path(sys.argv[2], f"rank-{rank}.json")
    out.write_text(json.dumps({"found": found, "steps": steps}))


if __name__ == "__main__":  # loader workers start through a forkserver, which imports this
    main()
