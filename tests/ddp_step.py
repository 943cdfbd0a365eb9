"""Run two meta-updates of the distributed plan on a glyph pack; rank 0 saves the parameters.

Started as one process or under torchrun by tests/test_train.py, to show that k processes and
one process make the same update: the plan splits each step's tasks over any number of ranks
(here 10 tasks per step and 100 per epoch, divisible by neither 3 nor 8), the stream draws the
same tasks whatever the world size, and the loss weights make DDP's average the task mean.
Float64 throughout, so that only a real difference of the update can show above the tolerance.
usage: ddp_step.py OUT.pt METHOD GRAD_ACCUM PACK
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from hmaml.config import Config
from hmaml.data.store import read_manifest
from hmaml.data.stream import train_loader
from hmaml.methods import build_method
from hmaml.models import build_encoder
from hmaml.train.engine import make_accelerator
from hmaml.train.loop import optimizer_step
from hmaml.train.plan import make_plan

STEPS = 2


def main(out: str, method_name: str, grad_accum: int, pack: str) -> None:
    cfg = Config()
    cfg.method.name = method_name
    cfg.method.hn_width = 32
    cfg.method.warmup_start, cfg.method.warmup_len = 0, 4
    cfg.train.meta_batch, cfg.train.episodes_per_epoch, cfg.train.grad_accum = 10, 100, grad_accum
    cfg.data.n_way, cfg.data.n_query = 4, 3
    accelerator = make_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    plan = make_plan(cfg, world)
    steps = plan.rank_steps(rank)
    image = read_manifest(pack).image
    loader = train_loader(pack, "train", n_way=4, n_shot=1, n_query=3, tasks_per_batch=1,
                          episodes=100, seed=7, rank=rank, world_size=world,
                          batches=[mb.tasks for step in steps for mb in step])
    torch.manual_seed(0)
    method = build_method(cfg.method, build_encoder("conv4", image.channels, image.size), 4)
    method.set_epoch(2)  # HyperMAML: p = 0.5, both update paths carry gradient
    method.double()  # float64: the comparison then rests on the semantics, not on rounding
    # SGD, not Adam: some HyperMAML parameters get an exactly-zero gradient in exact arithmetic
    # (the hypernetwork's output bias shifts every class's row alike, which softmax ignores);
    # Adam turns their rounding noise into full-size steps, SGD keeps it at noise level.
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = accelerator.prepare(method, optimizer)
    batches = iter(loader)
    for step in range(STEPS):
        micro = [dataclasses.replace(b, support_x=b.support_x.double(),
                                     query_x=b.query_x.double())
                 for b in (next(batches) for _ in steps[step])]
        weights = [0.0 if mb.padding else plan.weight(step) for mb in steps[step]]
        optimizer_step(accelerator, model, optimizer, micro, weights)
    if accelerator.is_main_process:
        torch.save({k: v.detach().clone() for k, v in
                    accelerator.unwrap_model(model).state_dict().items()}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
