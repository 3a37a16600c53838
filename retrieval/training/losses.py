"""Losses for dense-retrieval fine-tuning, and the cross-rank gather they need under DDP.

Passage layout (everywhere in this module): each query owns a *group* of `1 + n` passages,
its positive first, then its `n` hard negatives; a batch's passages are the groups one after
the other, `(B * (1 + n), dim)`. So query i's positive is passage `i * (1 + n)`, and every
other passage in the batch (other queries' positives and all hard negatives) is a negative.

Under DDP, `gather_across_ranks` concatenates every rank's tensor in rank order; the local
slice *is* the local tensor (it keeps its gradient) and the backward pass sums the gradients
that all ranks computed for each slice (an all-reduce), so with DDP's gradient averaging the
update equals that of one process holding the whole global batch. Labels of rank r's queries
are offset by r's position in the gathered passages (`rank * B * (1 + n)`) — getting this
offset wrong is what silently misaligns positives in naive implementations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithLocalGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        parts[rank] = tensor  # same values; the autograd graph below keeps only this slice
        ctx.rank, ctx.size = rank, tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        # every rank's loss touched every slice: sum them so each rank gets the full gradient of its slice
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated in rank order (equal first dimension on every rank)."""
    if not distributed():
        return tensor
    return _GatherWithLocalGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if not distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def contrastive_logits(
    queries: torch.Tensor, passages: torch.Tensor, group_size: int, temperature: float, label_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, P), labels (B,)): similarity / temperature of every query to every passage.

    `passages` holds all groups visible to these queries (under DDP: gathered from all ranks);
    query i's positive sits at `label_offset + i * group_size`.
    """
    if passages.shape[0] % group_size:
        raise ValueError(f"{passages.shape[0]} passages do not split into groups of {group_size}")
    logits = queries @ passages.T / temperature
    labels = label_offset + torch.arange(queries.shape[0], device=queries.device) * group_size
    return logits, labels


def contrastive_loss(
    queries: torch.Tensor,
    passages: torch.Tensor,
    group_size: int,
    temperature: float,
    mask: torch.Tensor | None = None,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-batch + hard-negative InfoNCE: (loss, logits, labels); passages gathered across ranks.

    `mask` (B, P_global), True where a passage must not count as a negative for that query
    (another copy of one of its judged positives); it never hides the labelled positive.
    """
    rank, _ = rank_and_world()
    local = passages.shape[0]
    all_passages = gather_across_ranks(passages) if gather else passages
    logits, labels = contrastive_logits(queries, all_passages, group_size, temperature, label_offset=rank * local)
    if mask is not None:
        keep_label = F.one_hot(labels, logits.shape[1]).bool()
        logits = logits.masked_fill(mask & ~keep_label, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, labels), logits, labels


def group_scores(queries: torch.Tensor, passages: torch.Tensor, group_size: int, temperature: float) -> torch.Tensor:
    """(B, group_size): each query against its own group only (positive first), divided by temperature."""
    groups = passages.view(queries.shape[0], group_size, -1)
    return torch.einsum("bd,bgd->bg", queries, groups) / temperature


def kl_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over queries.

    Both are (B, C) scores over the same C candidates per query. The T^2 factor keeps the
    gradient scale independent of T (Hinton et al., 2015).
    """
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.to(student.dtype) / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean() * temperature**2


def margin_mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MarginMSE (Hofstätter et al., 2020): MSE between (pos - neg_j) margins of student and teacher.

    Column 0 is the positive, columns 1.. the negatives, for both (B, C) tensors.
    """
    student_margin = student[:, :1] - student[:, 1:]
    teacher_margin = (teacher[:, :1] - teacher[:, 1:]).to(student.dtype)
    return F.mse_loss(student_margin, teacher_margin)
