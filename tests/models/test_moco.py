"""MoCoMCL: key-encoder init, momentum update, queue wrap-around, MLP head, shuffled BN."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.moco_aug import TwoCropsTransform, moco_augmentation
from models.moco import (
    MoCoMCL,
    batch_shuffle_ddp,
    batch_unshuffle_ddp,
    build_encoder,
    check_queue_size,
    pooled_features,
    write_into_queue,
)
from utils.errors import ConfigError


class TinyEncoder(nn.Module):
    """Small stand-in with the torchvision layout (features -> fc) and a BatchNorm."""

    def __init__(self, dim: int, mlp: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, dim)
        if mlp:
            self.fc = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), self.fc)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def tiny_factory(arch, dim, mlp):
    return TinyEncoder(dim, mlp)


def tiny_model(**kw):
    defaults = dict(arch="tiny", number_net=2, dim=8, queue_size=10, momentum=0.9, encoder_factory=tiny_factory)
    defaults.update(kw)
    return MoCoMCL(**defaults)


def test_key_encoders_start_as_copies_and_take_no_gradient():
    model = tiny_model()
    for enc_q, enc_k in zip(model.encoders_q, model.encoders_k):
        for p_q, p_k in zip(enc_q.parameters(), enc_k.parameters()):
            assert torch.equal(p_q, p_k)
            assert not p_k.requires_grad and p_q.requires_grad


def test_queue_is_normalised_with_one_pointer_per_network():
    model = tiny_model(number_net=3)
    assert model.queue.shape == (3, 8, 10)
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(3, 10))
    assert model.queue_ptr.tolist() == [0, 0, 0]


def test_momentum_update_formula():
    torch.manual_seed(0)
    model = tiny_model(momentum=0.9)
    with torch.no_grad():
        for p in model.encoders_q.parameters():
            p.add_(torch.randn_like(p))
    old_k = [p.clone() for p in model.encoders_k.parameters()]
    q = [p.clone() for p in model.encoders_q.parameters()]
    x = torch.randn(4, 3, 8, 8)
    model(x, x)
    for p_k, k0, p_q in zip(model.encoders_k.parameters(), old_k, q):
        assert torch.allclose(p_k, 0.9 * k0 + 0.1 * p_q, atol=1e-6)


def test_forward_returns_normalised_queries_and_keys():
    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
    queries, keys = model(x, x)
    assert len(queries) == len(keys) == 2
    for t in queries + keys:
        assert t.shape == (4, 8)
        assert torch.allclose(t.norm(dim=1), torch.ones(4), atol=1e-5)
    assert all(not k.requires_grad for k in keys)
    assert all(q.requires_grad for q in queries)


def test_write_into_queue_wraps_around():
    queue = torch.zeros(2, 10)
    ptr = 0
    for step in range(3):
        keys = torch.full((4, 2), float(step + 1))
        ptr = write_into_queue(queue, ptr, keys)
    assert ptr == 2
    # steps: cols 0-3 <- 1, 4-7 <- 2, then 8, 9, 0, 1 <- 3
    assert queue[0].tolist() == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]


def test_enqueue_updates_each_network_queue_and_pointer():
    model = tiny_model(queue_size=10)
    keys = [F.normalize(torch.randn(4, 8), dim=1) for _ in range(2)]
    for _ in range(3):
        model.enqueue(keys)
    assert model.queue_ptr.tolist() == [2, 2]
    for n in range(2):
        assert torch.equal(model.queue[n][:, 8:10], keys[n][:2].t())
        assert torch.equal(model.queue[n][:, 0:2], keys[n][2:4].t())


def test_enqueue_never_reads_the_pointer_to_the_host(monkeypatch):
    """The pointers stay device tensors: no GPU synchronisation per step and network."""
    model = tiny_model(queue_size=10)
    keys = [F.normalize(torch.randn(4, 8), dim=1) for _ in range(2)]

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read to the host")

    for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(3):
        model.enqueue(keys)
    monkeypatch.undo()
    assert model.queue_ptr.tolist() == [2, 2]
    assert torch.equal(model.queue[1][:, 0:2], keys[1][2:4].t())


def test_queue_size_check():
    check_queue_size(16, 16)
    with pytest.raises(ConfigError):
        check_queue_size(8, 16)


def test_mlp_head_is_real_and_receives_gradient():
    from losses.moco import moco_mcl_losses

    torch.manual_seed(0)
    model = MoCoMCL("resnet18", number_net=2, dim=16, queue_size=16, mlp=True)
    for enc in list(model.encoders_q) + list(model.encoders_k):
        assert isinstance(enc.fc, nn.Sequential)
        assert [type(m) for m in enc.fc] == [nn.Linear, nn.ReLU, nn.Linear]
        assert enc.fc[0].in_features == enc.fc[0].out_features == 512 and enc.fc[2].out_features == 16
    x = torch.randn(4, 3, 32, 32)
    queries, keys = model(x, x.flip(3))
    sum(moco_mcl_losses(queries, keys, model.queue, T=0.07)).backward()
    for enc in model.encoders_q:
        assert enc.fc[0].weight.grad.abs().sum() > 0
        assert enc.fc[2].weight.grad.abs().sum() > 0


def test_build_encoder_rejects_unknown_arch():
    with pytest.raises(ConfigError):
        build_encoder("not_a_net", 8, False)


def test_pooled_features_is_input_of_fc():
    enc = build_encoder("resnet18", 8, mlp=True).eval()
    feats = pooled_features(enc, torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 512)


def test_two_crops_transform_gives_two_views():
    from PIL import Image

    image = Image.new("RGB", (40, 30), color=(120, 30, 200))
    for aug_plus in (False, True):
        q, k = TwoCropsTransform(moco_augmentation(aug_plus, image_size=32))(image)
        assert q.shape == k.shape == (3, 32, 32) and q.dtype == torch.float32


def test_shuffle_and_unshuffle_round_trip_for_two_simulated_ranks(monkeypatch):
    """Both ranks draw rank 0's permutation (broadcast) and restore their own rows.

    The collectives are simulated in one process; the real gloo path runs in
    tests/test_main_moco_lincls.py (two processes, shuffled BN).
    """
    import models.moco as moco_module

    local = [torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * r for r in range(2)]
    gathered = torch.cat(local)
    monkeypatch.setattr(moco_module, "gather_nograd", lambda x, world_size: gathered if x.size(0) == 3 else x)
    monkeypatch.setattr(moco_module.dist, "broadcast", lambda tensor, src: None)
    shuffled = []
    for rank in range(2):
        torch.manual_seed(0)  # same draw on both ranks stands for the broadcast
        part, idx_unshuffle = batch_shuffle_ddp(local[rank], rank, 2)
        shuffled.append(part)
    assert sorted(map(tuple, torch.cat(shuffled).tolist())) == sorted(map(tuple, gathered.tolist()))
    shuffled_all = torch.cat(shuffled)
    monkeypatch.setattr(moco_module, "gather_nograd", lambda x, world_size: shuffled_all)
    for rank in range(2):
        assert torch.equal(batch_unshuffle_ddp(shuffled[rank], idx_unshuffle, rank, 2), local[rank])



def test_ddp_keeps_queues_out_of_the_buffer_broadcast_and_they_stay_equal(moco_two_ranks):
    """Every rank enqueues the gathered keys, so its queues equal the others' without DDP broadcasting
    N x dim x K floats each step; BatchNorm statistics are still broadcast; checkpoints keep the queues.
    The two gloo ranks ran tests/moco_ddp_check.py (once for the session)."""
    r0, r1 = (out["queue"] for out in moco_two_ranks)
    assert r0["ptr"].tolist() == r1["ptr"].tolist() == [0, 0]  # 3 steps x 2 ranks x 4 keys = 24 = 2 K
    assert torch.equal(r0["queue"], r1["queue"])
    assert torch.equal(r0["queue_after"], r0["queue"])
    assert r1["queue_after"][0, 0, 0] == r0["queue"][0, 0, 0] + 1.0  # not overwritten by rank 0's
    assert torch.equal(r1["queue_after"][1], r0["queue"][1])
    assert torch.equal(r0["bn_mean"], r1["bn_mean"])  # rank 1's change was overwritten by rank 0's
    assert r0["keys"] == r1["keys"] == sorted(tiny_model().state_dict())
    assert {"queue", "queue_ptr"} <= set(r0["keys"])
