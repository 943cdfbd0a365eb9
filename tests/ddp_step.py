"""Run a few meta-updates on one fixed meta-batch; rank 0 saves the parameters.

Started as one process or under torchrun by tests/test_train.py, to show that k processes and
one process make the same update on the same meta-batch.
usage: ddp_step.py OUT.pt METHOD GRAD_ACCUM
"""

from __future__ import annotations

import sys

import torch

from hmaml.config import Config
from hmaml.methods import build_method
from hmaml.models import build_encoder
from hmaml.train.loop import make_accelerator, optimizer_step
from tests.method_fixtures import random_tasks

TASKS, STEPS = 8, 3


def main(out: str, method_name: str, grad_accum: int) -> None:
    cfg = Config()
    cfg.method.name = method_name
    cfg.method.hn_width = 32
    cfg.method.warmup_start, cfg.method.warmup_len = 0, 4
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    method = build_method(cfg.method, build_encoder("conv4", 1, 16), 4)
    method.set_epoch(2)  # HyperMAML: p = 0.5, both update paths carry gradient
    # SGD, not Adam: some HyperMAML parameters get an exactly-zero gradient in exact arithmetic
    # (the hypernetwork's output bias shifts every class's row alike, which softmax ignores);
    # Adam turns their rounding noise into full-size steps, SGD keeps it at noise level.
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = accelerator.prepare(method, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    for step in range(STEPS):
        batch = random_tasks(tasks=TASKS, n_way=4, shot=1, query=3, seed=step)
        mine = batch.chunk(world)[rank]
        optimizer_step(accelerator, model, optimizer, mine.chunk(grad_accum))
    if accelerator.is_main_process:
        torch.save({k: v.detach().clone() for k, v in
                    accelerator.unwrap_model(model).state_dict().items()}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
