"""Self-supervised MCL on MoCo, as a method of the run loop (main_moco_mcl.py): N query/key encoder
pairs, one queue each, the MCL terms on instance logits, an optional kNN monitor.

Checkpoints hold the key encoders, queues and pointers (the model's state) and resume at
any step; the loop itself is utils/loop.py.
"""
import argparse
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import torch

from losses.moco import instance_logits, moco_mcl_losses
from models.moco import MoCoMCL
from utils import distributed as du
from utils.checkpoint import latest_checkpoint_path, link_checkpoint
from utils.knn import knn_top1
from utils.method import Method, StepResult
from utils.precision import Precision
from utils.step_module import compiled_function

TERMS = ("loss", "vcl", "soft_vcl", "icl", "soft_icl")


class MocoMethod(Method):
    """MoCo-MCL pre-training as a method of the run loop.

    ``knn`` is (train loader, val loader, classes) of --knn-data over this rank's shards, else
    None; with --knn-data every epoch records the kNN top-1 of each query encoder (every rank
    embeds its shards, utils/knn.py), and the best epoch is the best of them (no
    best.pth.tar: the encoders of every epoch are in the latest one).
    """

    terms = TERMS
    saves_best = False
    rank_streams = True  # augmentations differ per rank, also after a resume
    train_accuracy_prefix = "instance_"  # picking the positive key among the queue's, not a class

    def __init__(self, args: argparse.Namespace, model: MoCoMCL, ddp_model, device: torch.device,
                 precision: Precision, knn) -> None:
        self.args, self.model, self.ddp_model = args, model, ddp_model
        self.device, self.precision, self.knn = device, precision, knn
        self.num_heads = model.number_net
        self.losses = compiled_function(moco_mcl_losses, getattr(args, "compile", False))

    def to_device(self, raw: Any) -> Tuple[Tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        images, _ = raw
        prepare = self.precision.prepare_inputs
        im_q = prepare(images[0].to(self.device, non_blocking=True))
        im_k = prepare(images[1].to(self.device, non_blocking=True))
        return (im_q, im_k), torch.zeros(im_q.size(0), dtype=torch.long, device=im_q.device)

    def sample_images(self, inputs: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The two views of the first 16 images, side by side (query view, key view, ...)."""
        im_q, im_k = (x[:16] for x in inputs)
        return torch.stack([im_q, im_k], dim=1).flatten(0, 1)

    def forward(self, inputs: Tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> StepResult:
        args = self.args
        im_q, im_k = inputs
        with self.precision.autocast(self.device):
            queries, keys = self.ddp_model(im_q, im_k)
        # The encoders' fc heads are float32 (models/moco.py); queues, logits and losses too.
        queries, keys = [q.float() for q in queries], [k.float() for k in keys]
        # The losses read the queues as they were before this step's keys; enqueue comes after the update.
        terms = self.losses(queries, keys, self.model.queue, args.moco_t, args.kd_T)
        loss = terms.vcl + terms.soft_vcl + terms.icl + terms.soft_icl
        named = {"loss": loss, **terms._asdict()}
        with torch.no_grad():
            logits = instance_logits(queries, keys, self.model.queue, args.moco_t)
        return StepResult(named, logits, targets, lambda: self.model.enqueue(keys))

    def progress_line(self, epoch: int, step: int, total: int, lr: float, named: Dict[str, float], acc) -> str:
        top1 = 100.0 * acc.top1[0] / max(acc.total, 1)
        return (f"epoch {epoch + 1} step {step}/{total} lr {lr:.5f} "
                + " ".join(f"{k} {v:.4f}" for k, v in named.items()) + f" instance top-1(net 0) {top1:.2f}")

    def extra_state(self, for_best: bool = False) -> Dict[str, Any]:
        return {"queue_ptr": self.model.queue_ptr.tolist(),
                "queues": "model['queue'] (N, moco_dim, moco_k), model['queue_ptr'] (N,)"}

    def evaluate(self) -> Tuple[Dict[str, Any], Optional[float]]:
        """kNN top-1 per network, sharded over the ranks; nothing without --knn-data."""
        if self.knn is None:
            return {}, None
        # DDP broadcasts BatchNorm statistics before each training forward, so after the last
        # step every rank holds its own; embed with rank 0's, which its checkpoint saves.
        du.broadcast_buffers(self.model.encoders_q)
        main_process = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        result = knn_top1(self.model, self.knn, self.device, self.args.max_eval_batches,
                          self.args.knn_k, self.args.knn_t, progress=not self.args.no_progress and main_process)
        return {"knn": {"top1": result}}, max(result)

    def format_epoch(self, record: Dict[str, Any]) -> str:
        return format_epoch(record)

    def on_finished(self, loop: Any, summary: Dict[str, Any]) -> None:
        final, original = link_final_checkpoint(loop.run_dir, self.args.epochs)
        loop.logger.text(f"finished {self.args.epochs} epochs; encoders for main_lincls.py: {final} "
                         f"(also linked as {original})")

    def summary(self, state: Any, records: List[Dict[str, Any]], epochs: int) -> Dict[str, Any]:
        last = records[-1] if records else {}
        monitored = state.best_epoch > 0  # best_acc is the kNN monitor's; none without --knn-data
        return {"finished": True, "epochs": epochs, "best_acc": state.best_acc if monitored else None,
                "best_epoch": state.best_epoch if monitored else None, "last_train": last.get("train"),
                "last_knn_top1": (last.get("knn") or {}).get("top1")}


def link_final_checkpoint(run_dir: str, epochs: int) -> Tuple[str, str]:
    """Link the finished latest checkpoint as checkpoint_<last epoch>.pth.tar, the original's name, in the
    run directory and in its parent (where the original wrote it; the newest run's): (both paths)."""
    name = f"checkpoint_{epochs - 1:04d}.pth.tar"
    latest = latest_checkpoint_path(run_dir)
    final = os.path.join(run_dir, name)
    original = os.path.join(os.path.dirname(os.path.abspath(run_dir)), name)
    for path in (final, original):
        link_checkpoint(latest, path)
    return final, original


def format_epoch(record: Dict[str, Any]) -> str:
    """One readable line per pre-training epoch."""
    tr = record["train"]
    terms = " ".join(f"{k}={tr[k]:.4f}" for k in TERMS)
    acc = " ".join(f"{v:.2f}" for v in tr["top1"])
    line = (f"epoch {record['epoch']}/{record['epochs']} lr={record['lr']:.5f} {terms} | "
            f"instance top-1 [{acc}] | {record['time_s']:.1f}s {record['images_per_s']:.0f} img/s")
    if "knn" in record:
        line += " | kNN top-1 [" + " ".join(f"{v:.2f}" for v in record["knn"]["top1"]) + "]"
    return line


def sampler_seed_for(seed: Optional[int], ckpt: Optional[Dict[str, Any]]) -> int:
    """The data order's seed: the resumed run's, else ``seed``, else a fresh one shared by all ranks."""
    if ckpt is not None and (ckpt.get("sampler") or {}).get("seed") is not None:
        return int(ckpt["sampler"]["seed"])
    if seed is not None:
        return seed
    return int(du.broadcast_object(random.SystemRandom().randrange(2 ** 31)))
