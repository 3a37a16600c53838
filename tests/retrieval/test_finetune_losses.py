"""Contrastive logits/labels, KL and MarginMSE against hand computations, and the DDP gather (2 gloo processes)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retrieval.training.losses import (
    contrastive_logits,
    contrastive_loss,
    gather_across_ranks,
    group_scores,
    kl_distillation_loss,
    margin_mse_loss,
)


def test_logits_shape_and_labels_for_in_batch_plus_hard_negatives() -> None:
    batch, hard, dim = 4, 3, 8
    group = 1 + hard
    q = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0))
    p = torch.randn(batch * group, dim, generator=torch.Generator().manual_seed(1))
    logits, labels = contrastive_logits(q, p, group, temperature=0.5)
    assert logits.shape == (batch, batch * group)  # every query against every passage of the batch
    assert labels.tolist() == [0, 4, 8, 12]  # each query's positive opens its group
    torch.testing.assert_close(logits[2, 8], q[2] @ p[8] / 0.5)
    loss, _, _ = contrastive_loss(q, p, group, 0.5)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="groups of 4"):
        contrastive_logits(q, p[:-1], 4, 1.0)


def test_false_negative_mask_hides_duplicates_but_never_the_label() -> None:
    q = torch.eye(4)[[0, 2]]  # each query equals its own positive
    p = torch.eye(4)  # groups of 2: [p0, n0], [p1, n1]
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])  # query 0 also likes passage 2
    loss_masked, logits, labels = contrastive_loss(q, p, 2, 1.0, mask=mask)
    assert logits[0, 2] == torch.finfo(logits.dtype).min and logits[0, 0] == 1.0
    expected0 = -math.log(math.e / (math.e + 2))  # passages 1 and 3 remain as negatives of query 0
    expected1 = -math.log(math.e / (math.e + 3))
    assert loss_masked.item() == pytest.approx((expected0 + expected1) / 2, rel=1e-6)


def test_kl_distillation_equals_hand_computed_value() -> None:
    student = torch.tensor([[1.0, 2.0, 3.0]])
    teacher = torch.tensor([[3.0, 1.0, 0.0]])
    t = 2.0

    def softmax(xs):
        exps = [math.exp(x / t) for x in xs]
        return [e / sum(exps) for e in exps]

    p_t, p_s = softmax([3.0, 1.0, 0.0]), softmax([1.0, 2.0, 3.0])
    expected = t * t * sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    assert kl_distillation_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    assert kl_distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_margin_mse_equals_hand_computed_value() -> None:
    student = torch.tensor([[2.0, 1.0, 0.0]])
    teacher = torch.tensor([[5.0, 1.0, 4.0]])
    # margins: student (1, 2), teacher (4, 1) -> ((1-4)^2 + (2-1)^2) / 2
    assert margin_mse_loss(student, teacher).item() == pytest.approx(5.0)


def test_group_scores_pick_each_querys_own_group() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
    assert group_scores(q, p, 2, 0.5).tolist() == [[2.0, 0.0], [4.0, 0.0]]


# ------------------------------------------------------------------------------ DDP (2 gloo processes)

WORLD, LOCAL_QUERIES, GROUP, DIM, TEMP = 2, 3, 3, 16, 0.1


def global_tensors():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(WORLD * LOCAL_QUERIES, DIM, generator=g), dim=-1)
    p = F.normalize(torch.randn(WORLD * LOCAL_QUERIES * GROUP, DIM, generator=g), dim=-1)
    return q, p


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        q_all, p_all = global_tensors()
        q = q_all[rank * LOCAL_QUERIES : (rank + 1) * LOCAL_QUERIES].clone().requires_grad_(True)
        p = p_all[rank * LOCAL_QUERIES * GROUP : (rank + 1) * LOCAL_QUERIES * GROUP].clone().requires_grad_(True)
        loss, logits, labels = contrastive_loss(q, p, GROUP, TEMP)
        loss.backward()
        gathered = gather_across_ranks(p.detach())
        # alignment: the labelled column of each local query is that query's own positive
        aligned = torch.equal(gathered[labels], p.detach()[::GROUP])
        # a query identical to its positive must score it highest among all gathered passages
        q_probe = p.detach()[::GROUP].clone()
        _, probe_logits, probe_labels = contrastive_loss(q_probe, p.detach(), GROUP, TEMP)
        torch.save(
            {
                "loss": loss.detach(),
                "q_grad": q.grad,
                "p_grad": p.grad,
                "labels": labels,
                "aligned": aligned,
                "probe_hits": (probe_logits.argmax(1) == probe_labels).all().item(),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_gather_matches_one_big_batch_and_keeps_positives_aligned(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    q_all, p_all = global_tensors()
    q_ref, p_ref = q_all.clone().requires_grad_(True), p_all.clone().requires_grad_(True)
    ref_loss, _, ref_labels = contrastive_loss(q_ref, p_ref, GROUP, TEMP)
    ref_loss.backward()

    for r, out in enumerate(ranks):
        assert out["aligned"] and out["probe_hits"]
        # rank r's labels point into the gathered passages at r's offset
        assert out["labels"].tolist() == ref_labels[r * LOCAL_QUERIES : (r + 1) * LOCAL_QUERIES].tolist()
    # DDP averages over ranks: mean of local losses = the global loss, gradient / world = global gradient
    assert torch.stack([o["loss"] for o in ranks]).mean().item() == pytest.approx(ref_loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([o["q_grad"] for o in ranks]) / WORLD, q_ref.grad)
    torch.testing.assert_close(torch.cat([o["p_grad"] for o in ranks]) / WORLD, p_ref.grad)
