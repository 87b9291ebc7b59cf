"""A small study run by ``tests/test_distributed.py`` under ``torchrun`` (2 gloo ranks of one
thread): every rank runs its share of the cells into OUT. With DIE_AFTER >= 0, rank 1 exits
abruptly when it has finished that many cells (a rank that dies mid-study). Every rank writes
the keys of the cells it ran to ``OUT/ran-rank<r>.json``.

    torchrun --standalone --nproc_per_node=2 tests/distributed/study_job.py OUT DIE_AFTER
"""
import json
import os
import sys
from pathlib import Path

import torch

from fastmetamer import distributed
from fastmetamer.study import runner

STUDY = dict(quick=True, datasets=["synthetic"], architectures=["gcn"], mitigations=["none"], targets=4, steps=40)


def main(out: str, die_after: int) -> None:
    torch.set_num_threads(1)
    started = distributed.init_from_environment()
    rank = distributed.world()[0]
    ran, real = [], runner.run_cell
    Path(out, f"ran-rank{rank}.json").write_text("[]")

    def run_cell(cell, *args, **kwargs):
        if rank == 1 and len(ran) == die_after:
            os._exit(3)
        record = real(cell, *args, **kwargs)
        ran.append(cell.key)
        Path(out, f"ran-rank{rank}.json").write_text(json.dumps(ran))
        return record

    runner.run_cell = run_cell
    runner.run_study(out, **STUDY)
    if started:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
