"""Prototypical Networks: the strong simple baseline (squared Euclidean distance to class means)."""

from __future__ import annotations

import torch

from hmaml.methods.base import Method, MethodOutput
from hmaml.methods.functional import class_means, one_hot, task_cross_entropy
from hmaml.tasks import TaskBatch


class ProtoNet(Method):
    """logits = -||e_q - c_n||^2 with c_n the mean support embedding of class n."""

    def classify(self, batch: TaskBatch) -> MethodOutput:
        support, query = self.embed(batch)
        protos = class_means(support, one_hot(batch.support_y, self.n_way, support.dtype))
        # ||q||^2 - 2 q.c + ||c||^2, all tasks in one batched matmul
        logits = (2 * torch.bmm(query, protos.transpose(1, 2))
                  - query.pow(2).sum(-1, keepdim=True) - protos.pow(2).sum(-1).unsqueeze(1))
        task_loss = task_cross_entropy(logits, batch.query_y)
        return MethodOutput(logits, task_loss.mean(), task_loss)
