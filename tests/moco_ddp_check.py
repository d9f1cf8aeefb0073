"""Two gloo ranks running MoCo's distributed paths on tiny models, once for the whole session
(the ``moco_two_ranks`` fixture of conftest.py): what tests/models/test_moco.py (queues under
DDP) and tests/utils/test_knn.py (the sharded kNN monitor) compare."""
import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data.samplers import ShardedEvalSampler
from tests.models.test_moco import tiny_model
from utils import distributed as du
from utils import knn
from utils.loop import wrap_ddp

KNN_CLASSES = 3


def knn_split(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """``n`` labelled 6x6 images of KNN_CLASSES classes whose mean grows with the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % KNN_CLASSES
    images = torch.randn(n, 3, 6, 6, generator=g) + labels.view(-1, 1, 1, 1).float()
    return torch.utils.data.TensorDataset(images, labels)


def knn_monitor(rank: int, world_size: int) -> List[float]:
    """kNN top-1 of a fixed tiny MoCoMCL on this rank's uneven shards (train 31, val 11, batches of 4)."""
    torch.manual_seed(0)
    model = tiny_model(number_net=2)
    loaders = [torch.utils.data.DataLoader(ds, batch_size=4, sampler=ShardedEvalSampler(len(ds), rank, world_size))
               for ds in (knn_split(31, 1), knn_split(11, 2))]
    return knn.knn_top1(model, (*loaders, KNN_CLASSES), torch.device("cpu"), max_batches=0, k=5, t=0.1)


def queue_check(rank: int) -> Dict[str, Any]:
    """Three DDP steps of a tiny MoCoMCL, then a forward after rank 1 alone changed its queue
    and a BatchNorm statistic."""
    torch.manual_seed(0)  # the same weights and queues on both ranks
    model = tiny_model(queue_size=12, rank=rank, world_size=2)
    ctx = du.DistContext(rank=rank, world_size=2, distributed=True)
    ddp = wrap_ddp(model, ctx, not_broadcast=model.RANK_IDENTICAL_BUFFERS)
    optimizer = torch.optim.SGD(model.encoders_q.parameters(), lr=0.5)
    torch.manual_seed(1 + rank)  # different images on each rank
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6)
        queries, keys = ddp(x, x.flip(3))
        optimizer.zero_grad()
        sum((q[:, 0] - q[:, 1]).pow(2).sum() for q in queries).backward()
        optimizer.step()
        model.enqueue(keys)
    out = {"queue": model.queue.clone(), "ptr": model.queue_ptr.clone()}
    bn = model.encoders_q[0].bn
    if rank == 1:  # if DDP broadcast the queues, rank 0's would overwrite this
        model.queue[0, 0, 0] += 1.0
        bn.running_mean += 1.0
    ddp.eval()  # BatchNorm keeps its statistics: what the forward's broadcast left is visible
    x = torch.randn(4, 3, 6, 6)
    ddp(x, x)
    out.update(queue_after=model.queue.clone(), bn_mean=bn.running_mean.clone(), keys=sorted(model.state_dict()))
    del ddp  # a DDP wrapper alive at destroy_process_group can abort the exit
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rows = du.all_gather_rows(torch.full((rank + 1, 2), float(rank)))  # 1 row from rank 0, 2 from rank 1
    out = {"queue": queue_check(rank), "knn_top1": knn_monitor(rank, 2), "gathered_rows": rows}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    du.cleanup(wait_for_all=True)


def run_two_ranks(out_dir: str) -> List[Dict[str, Any]]:
    """Run the checks on 2 gloo processes; what each rank saved, in rank order."""
    mp.start_processes(_worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=2, join=True,
                       start_method="fork")
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(2)]
