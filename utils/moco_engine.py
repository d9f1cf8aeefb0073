"""MoCo-MCL pre-training loop (SPEC section 4) of main_moco_mcl.py: N query/key encoder
pairs, one queue each, the MCL terms on instance logits, an optional kNN monitor.

Checkpoints hold the key encoders, queues and pointers (the model's state) and resume at
any step; see utils/epoch_loop.py for the loop itself.
"""
import argparse
import math
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import torch

from losses.moco import instance_logits, moco_mcl_losses
from models.moco import MoCoMCL
from utils import distributed as du
from utils.checkpoint import atomic_save
from utils.engine import NonFiniteLossError
from utils.epoch_loop import EpochLoop, reduced_means
from utils.errors import CheckpointError
from utils.knn import knn_top1
from utils.logging import read_metrics
from utils.run import load_for_run

TERMS = ("loss", "vcl", "soft_vcl", "icl", "soft_icl")


class MocoRun(EpochLoop):
    """Epoch loop of MoCo-MCL pre-training with exact checkpoints and graceful stop.

    ``knn`` is (train loader, val loader, classes) of --knn-data on rank 0, else None.
    """

    def __init__(self, args, ctx, model: MoCoMCL, ddp_model, optimizer, loader, sampler, knn, logger,
                 run_dir: str, meta: Dict[str, Any], stop=None) -> None:
        super().__init__(args, ctx, model, ddp_model, optimizer, loader, sampler, logger, run_dir, meta,
                         num_heads=model.number_net, stop=stop)
        self.knn = knn

    @property
    def lr_type(self) -> str:
        return "cosine" if self.args.cos else "multistep"

    # ----- checkpoints ----------------------------------------------------------
    def meters_state(self) -> Dict[str, Any]:
        return {**super().meters_state(), "images": self.state.images}

    def extra_state(self) -> Dict[str, Any]:
        return {"queue_ptr": self.model.queue_ptr.tolist(),
                "queues": "model['queue'] (N, moco_dim, moco_k), model['queue_ptr'] (N,)"}

    # ----- one step -------------------------------------------------------------
    def to_device(self, raw: Any) -> Tuple[Tuple[torch.Tensor, torch.Tensor], None]:
        images, _ = raw
        device, prepare = self.ctx.device, self.precision.prepare_inputs
        return (prepare(images[0].to(device, non_blocking=True)),
                prepare(images[1].to(device, non_blocking=True))), None

    def train_step(self, inputs: Tuple[torch.Tensor, torch.Tensor], _targets: None) -> Tuple[Dict[str, float], int]:
        args, s = self.args, self.state
        im_q, im_k = inputs
        with self.precision.autocast(self.ctx.device):
            queries, keys = self.ddp_model(im_q, im_k)
        # Under --amp the encoders run in bf16/fp16; the queues, logits and losses stay float32.
        queries, keys = [q.float() for q in queries], [k.float() for k in keys]
        # The losses read the queues as they were before this step's keys; enqueue comes after backward.
        terms = moco_mcl_losses(queries, keys, self.model.queue, args.moco_t, args.kd_T)
        loss = terms.vcl + terms.soft_vcl + terms.icl + terms.soft_icl
        values = torch.stack([loss.detach(), *(t.detach() for t in terms)]).float().tolist()
        named = dict(zip(TERMS, values))
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLossError(f"non-finite loss at epoch {s.epoch} step {s.step}: {named}; "
                                     f"the latest good checkpoint is {self.latest_path}; lower --lr")
        logits = instance_logits(queries, keys, self.model.queue, args.moco_t)
        self.optimize(loss)
        self.model.enqueue(keys)
        targets = torch.zeros(im_q.size(0), dtype=torch.long, device=im_q.device)
        s.train_acc.update(logits, targets)
        return named, im_q.size(0)

    def progress_line(self, lr: float, total: int, named: Dict[str, float]) -> str:
        acc = self.state.train_acc
        top1 = 100.0 * acc.top1[0] / max(acc.total, 1)
        return (f"Epoch: [{self.state.epoch}][{self.state.step}/{total}] lr {lr:.5f} "
                + " ".join(f"{k} {v:.4f}" for k, v in named.items()) + f" acc@1(net0) {top1:.2f}")

    # ----- epochs ---------------------------------------------------------------
    def monitor(self) -> Optional[List[float]]:
        """kNN top-1 per network on rank 0 (the other ranks wait), or None without --knn-data."""
        if not self.args.knn_data:
            return None
        result = None
        if self.knn is not None:
            result = knn_top1(self.model, self.knn, self.ctx.device, self.args.max_eval_batches,
                              self.args.knn_k, self.args.knn_t)
        du.barrier()
        return result

    def end_epoch(self) -> None:
        s = self.state
        lr = self.optimizer.param_groups[0]["lr"]
        train = reduced_means(s.train_acc, s.train_meter, TERMS, self.ctx.device)
        knn = self.monitor()
        record = {"epoch": s.epoch, "epochs": self.args.epochs, "lr": lr, "time_s": s.elapsed,
                  "images_per_s": s.images / s.elapsed if s.elapsed > 0 else 0.0, "train": train}
        if knn is not None:
            if max(knn) > s.best_acc or s.best_epoch < 0:
                s.best_acc, s.best_epoch = max(knn), s.epoch
            record["knn"] = {"top1": knn}
            record.update(best_acc=s.best_acc, best_epoch=s.best_epoch)
        self.next_epoch()
        self.save()
        self.logger.log_epoch(record)
        self.logger.text(format_epoch(record))

    def on_finished(self) -> None:
        final = os.path.join(self.run_dir, f"checkpoint_{self.args.epochs - 1:04d}.pth.tar")
        atomic_save(self.checkpoint(), final)
        self.logger.write_summary(self.summary())
        self.logger.text(f"finished {self.args.epochs} epochs; encoders for main_lincls.py: {final}")

    def summary(self) -> Dict[str, Any]:
        s = self.state
        records = read_metrics(self.logger.metrics_path)
        last = records[-1] if records else {}
        monitored = s.best_epoch >= 0  # best_acc is the kNN monitor's; none without --knn-data
        return {"finished": True, "epochs": self.args.epochs, "best_acc": s.best_acc if monitored else None,
                "best_epoch": s.best_epoch if monitored else None, "last_train": last.get("train"),
                "last_knn_top1": (last.get("knn") or {}).get("top1")}


def format_epoch(record: Dict[str, Any]) -> str:
    """One readable line per pre-training epoch."""
    tr = record["train"]
    terms = " ".join(f"{k}={tr[k]:.4f}" for k in TERMS)
    acc = " ".join(f"{v:.2f}" for v in tr["top1"])
    line = (f"epoch {record['epoch'] + 1}/{record['epochs']} lr={record['lr']:.5f} {terms} | "
            f"instance top-1 [{acc}] | {record['time_s']:.1f}s {record['images_per_s']:.0f} img/s")
    if "knn" in record:
        line += " | kNN top-1 [" + " ".join(f"{v:.2f}" for v in record["knn"]["top1"]) + "]"
    return line


def load_resume_checkpoint(path: str, args: argparse.Namespace) -> Dict[str, Any]:
    """A main_moco_mcl.py checkpoint whose model has the shape this run builds."""
    ckpt = load_for_run(path, arch=args.arch, number_net=args.number_net)
    if ckpt.get("script") != "main_moco_mcl":
        raise CheckpointError(f"{path} was written by {ckpt.get('script')}.py, not main_moco_mcl.py")
    stored = ckpt.get("config") or {}
    for key in ("mlp", "moco_dim", "moco_k"):
        if key in stored and stored[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"{path} was trained with {flag} {stored[key]} but this run has "
                                  f"{getattr(args, key)}; pass the same {flag}")
    return ckpt


def sampler_seed_for(seed: Optional[int], ckpt: Optional[Dict[str, Any]]) -> int:
    """The data order's seed: the resumed run's, else ``seed``, else a fresh one shared by all ranks."""
    if ckpt is not None and (ckpt.get("sampler") or {}).get("seed") is not None:
        return int(ckpt["sampler"]["seed"])
    if seed is not None:
        return seed
    return int(du.broadcast_object(random.SystemRandom().randrange(2 ** 31)))
