"""L-MCL (Yang et al., TPAMI 2023) as a method of the run loop (main_cifar.py / main_imagenet.py --method lmcl).

One step: forward every network with its auxiliary branches, project every (network, stage)
feature with its own head, mix each network's stage logits with the aggregator, and minimise
the normal-update loss of utils/lmcl_step.py (stage and aggregated cross-entropy, KL of every
final head toward every detached aggregate, the layer-wise MCL terms scaled by the weight
network's pair weights). After the optimizer step, on the first step of an epoch and every
``meta_freq``-th after it, the meta step trains the weight network through virtual SGD steps
of the networks and heads (utils/lmcl_step.py, utils/unrolled.py).

The contrast comes in as an object: :class:`LayerInBatchContrast` (CIFAR, the global batch
under DDP) or :class:`LayerMemoryContrast` (ImageNet, one memory bank per network). Each gives
``main`` (the normal update's terms) and ``meta`` (the meta step's: this process's batch only,
no state changed).

Evaluation, per network: the final head (the network itself, what export keeps) and the
aggregated logits (aggregator over all its stages, auxiliary branches included); the ensemble
is the mean of the final heads' logits. The best epoch is that of the best final-head top-1.
"""
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from data.batch import Batch
from losses.ensemble import ensemble_logits
from losses.lmcl import StageProjectionHeads, layer_mcl_losses, memory_layer_mcl_losses, update_layer_memories
from losses.mcl import MCLLosses
from losses.memory import init_memory
from models.lmcl_modules import Aggregator, LossWeightNetwork
from utils import distributed as du
from utils.lmcl_step import (CohortWithStageHeads, LMCLObjective, apply_hypergradient, functional_forward,
                             main_losses, meta_step)
from utils.loop import RunState
from utils.method import StepResult
from utils.metrics import AccuracyCounter, CalibrationCounter, reduce_accuracy
from utils.precision import Precision
from utils.progress import progress as progress_bar
from utils.supervised import TERMS, SupervisedMethod, _batches

# What each evaluation figure is computed from (written to summary.json and the log).
HEAD_NOTES = {
    "top1": "final head of each network (the network itself, without auxiliary branches)",
    "agg_top1": "aggregated logits of each network (its aggregator over all stages, auxiliary branches included)",
    "ens_top1": "ensemble: softmax of the mean of the networks' final-head logits",
}


class LMCLModel(nn.Module):
    """The L-MCL cohort, its per-(network, stage) projection heads and the aggregator: what the
    normal update trains (one optimizer, one DDP wrapper).

    ``forward(x) -> (logits[i][s] (B, C), features[i][s] (B, F_i), embeddings[i][s] (B, D),
    aggregated n x (B, C), attention n x (B, S))``.
    """

    def __init__(self, cohort: nn.Module, heads: StageProjectionHeads, aggregator: Aggregator) -> None:
        super().__init__()
        self.cohort = cohort
        self.heads = heads
        self.aggregator = aggregator

    def forward(self, x: Tensor):
        logits, features = self.cohort(x)
        embeddings = self.heads(features)
        aggregated, attention = self.aggregator(features, logits)
        return logits, features, embeddings, aggregated, attention

    def theta(self) -> CohortWithStageHeads:
        """The networks and heads (not the aggregator) as one module: theta of the meta step."""
        return CohortWithStageHeads(self.cohort, self.heads)


def build_lmcl_model(cohort: nn.Module, feat_dim: int) -> Tuple[LMCLModel, LossWeightNetwork]:
    """Heads, aggregator and weight network sized for ``cohort`` (an models.lmcl.LMCLCohort)."""
    stages = cohort.number_stage
    heads = StageProjectionHeads(cohort.feature_dims, stages, feat_dim)
    aggregator = Aggregator(cohort.feature_dims, stages)
    weight_net = LossWeightNetwork([[d] * stages for d in cohort.feature_dims])
    return LMCLModel(cohort, heads, aggregator), weight_net


# ----------------------------------------------------------------------------- contrasts

def _gather_pair_weights(weights: Tensor) -> Tensor:
    """(P, B) on each rank -> (P, W*B) in rank order (no gradient: the normal update's weights have none)."""
    return du.all_gather_nograd(weights.t().contiguous()).t()


class LayerInBatchContrast:
    """CIFAR: the layer-wise MCL terms within the batch (losses/lmcl.py).

    ``main`` gathers embeddings (with gradient), labels and pair weights over the processes, so
    every process computes the loss of the global batch, as MCL's InBatchContrast does; ``meta``
    uses this process's batch (the meta step runs on each process alone; its hypergradients are
    averaged).
    """

    def __init__(self, tau: float, kd_T: float) -> None:
        self.tau, self.kd_T = tau, kd_T

    def main(self, batch: Batch):
        def contrast(embeddings, targets: Tensor, weights: Tensor) -> MCLLosses:
            gathered = [[du.all_gather_grad(e) for e in net] for net in embeddings]
            return layer_mcl_losses(gathered, du.all_gather_nograd(targets), _gather_pair_weights(weights),
                                    self.tau, self.kd_T)
        return contrast

    def meta(self, batch: Batch):
        return lambda embeddings, targets, weights: layer_mcl_losses(embeddings, targets, weights, self.tau,
                                                                     self.kd_T)


class LayerMemoryContrast(nn.Module):
    """ImageNet: the layer-wise MCL terms against one memory bank per network (losses/lmcl.py).

    The banks are buffers ``memory_0 ... memory_{N-1}`` (n_data, feat_dim), seeded alike on
    every process and saved with the checkpoint. The loss reads them with this process's batch
    (its pos_idx / neg_idx); ``after_step`` updates them from the final stage's embeddings of
    the batch gathered over all processes, so every process keeps identical banks.
    """

    def __init__(self, number_net: int, n_data: int, feat_dim: int, tau: float, kd_T: float, momentum: float,
                 vcl_partner_memory: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.number_net, self.tau, self.kd_T, self.momentum = number_net, tau, kd_T, momentum
        self.vcl_partner_memory = vcl_partner_memory
        generator = torch.Generator().manual_seed(seed)
        for n in range(number_net):
            self.register_buffer(f"memory_{n}", init_memory(n_data, feat_dim, generator=generator))

    @property
    def memories(self) -> List[Tensor]:
        return [getattr(self, f"memory_{n}") for n in range(self.number_net)]

    def main(self, batch: Batch):
        def contrast(embeddings, targets: Tensor, weights: Tensor) -> MCLLosses:
            return memory_layer_mcl_losses(embeddings, self.memories, batch.pos_idx, batch.neg_idx, weights,
                                           self.tau, self.kd_T, self.vcl_partner_memory)
        return contrast

    meta = main  # reads the banks, never writes them

    @torch.no_grad()
    def after_step(self, embeddings: List[List[Tensor]], batch: Batch) -> None:
        last = torch.stack([net[-1].detach().float() for net in embeddings], dim=1)  # (B, N, D)
        stacked = du.all_gather_nograd(last)
        index = du.all_gather_nograd(batch.index)
        update_layer_memories(self.memories, [[e] for e in stacked.unbind(dim=1)], index[:, None], self.momentum)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_lmcl(model: LMCLModel, eval_data: Iterable, device: torch.device, precision: Precision,
                  max_batches: int = 0, progress: bool = False) -> Dict[str, Any]:
    """Test metrics over all ranks (see HEAD_NOTES for what each uses): ``top1``/``top5``/``nll``/``ece``
    lists of N (final heads), ``agg_top1``/``agg_top5`` lists of N (aggregated logits), the ``ens_``
    keys (ensemble of the final heads), ``loss`` (mean final-head NLL), ``images``."""
    model.eval()
    n = model.cohort.number_net
    heads = 2 * n + 1  # final heads, aggregated, ensemble
    counter, calibration = AccuracyCounter(heads), CalibrationCounter(heads)
    for i, raw in enumerate(progress_bar(eval_data, _batches(eval_data, max_batches), "evaluating", progress)):
        if max_batches and i >= max_batches:
            break
        batch = Batch.from_loader(raw).to(device)
        with precision.autocast(device):
            logits, _, _, aggregated, _ = model(precision.prepare_inputs(batch.inputs))
        finals = [net[-1].float() for net in logits]
        every = finals + [z.float() for z in aggregated] + [ensemble_logits(finals)]
        counter.update(every, batch.targets)
        calibration.update(every, batch.targets)
    top1, top5, total, _ = reduce_accuracy(counter, device)
    nll, ece = calibration.reduce(device)
    return {"top1": top1[:n], "top5": top5[:n], "agg_top1": top1[n:2 * n], "agg_top5": top5[n:2 * n],
            "ens_top1": top1[-1], "ens_top5": top5[-1], "nll": nll[:n], "ens_nll": nll[-1], "ece": ece[:n],
            "ens_ece": ece[-1], "loss": sum(nll[:n]) / n, "images": total}


class FinalStages(nn.Module):
    """An L-MCL cohort seen as a plain one: ``forward(x) -> (final logits n x (B, C), final features)``."""

    def __init__(self, cohort: nn.Module) -> None:
        super().__init__()
        self.cohort = cohort
        self.number_net = cohort.number_net

    def forward(self, x: Tensor):
        logits, features = self.cohort(x)
        return [net[-1] for net in logits], [net[-1] for net in features]


# ----------------------------------------------------------------------------- the method

@dataclass(frozen=True)
class MetaConfig:
    """When and how the meta step runs (--meta-freq --times --exact-hypergradient --restore-bn-after-meta);
    momentum and weight decay of the virtual steps and of the weight optimizer."""

    freq: int = 50
    times: int = 2
    exact_hypergradient: bool = False
    restore_bn: bool = False
    momentum: float = 0.9
    weight_decay: float = 5e-4


class LMCLMethod(SupervisedMethod):
    """L-MCL's step, meta step, evaluation and state; see the module docstring.

    ``optimizer``: the loop's (networks, heads, aggregator); its learning rate is also the
    weight optimizer's and the virtual steps'. Call :meth:`attach` with the loop's state: the
    meta step's phase is the loop's step within the epoch (restored on resume).
    """

    terms = TERMS

    def __init__(self, model: LMCLModel, ddp_model: nn.Module, weight_net: LossWeightNetwork,
                 weight_optimizer: torch.optim.Optimizer, optimizer: torch.optim.Optimizer,
                 objective: LMCLObjective, contrast: Any, meta: MetaConfig, eval_data: Any, device: torch.device,
                 precision: Precision, max_eval_batches: int = 0, progress: bool = False,
                 embeddings: int = 0) -> None:
        super().__init__(model, ddp_model, None, contrast, eval_data, device, precision, max_eval_batches,
                         progress, embeddings)
        self.lmcl_objective, self.meta = objective, meta
        self.weight_net, self.weight_optimizer, self.optimizer = weight_net, weight_optimizer, optimizer
        self.theta = model.theta()
        self.state: Optional[RunState] = None
        self.meta_steps = 0  # in this process (for tests and logs)

    def attach(self, state: RunState) -> None:
        self.state = state

    def forward(self, batch: Batch, targets: torch.Tensor) -> StepResult:
        with self.precision.autocast(self.device):
            logits, features, embeddings, aggregated, attention = self.ddp_model(
                self.precision.prepare_inputs(batch.inputs))
        logits = [[z.float() for z in net] for net in logits]
        features = [[f.float() for f in net] for net in features]
        aggregated = [z.float() for z in aggregated]
        out = main_losses(logits, features, embeddings, targets, self.weight_net,
                          lambda _f, _z: (aggregated, attention), self.lmcl_objective, self.contrast.main(batch))
        finals = [net[-1].detach() for net in logits]
        kept = [[e.detach() for e in net] for net in embeddings]
        return StepResult(out.terms, finals + [ensemble_logits(finals)], targets,
                          lambda: self.after_update(kept, batch))

    def after_update(self, embeddings: List[List[Tensor]], batch: Batch) -> None:
        if hasattr(self.contrast, "after_step"):
            self.contrast.after_step(embeddings, batch)
        step = self.state.step if self.state is not None else 0  # batches of the epoch before this one
        if step % self.meta.freq == 0:
            self.meta_update(batch)

    def meta_update(self, batch: Batch) -> None:
        """The meta step on this batch, its hypergradient averaged over the processes, one weight-optimizer step."""
        lr = self.optimizer.param_groups[0]["lr"]
        theta = self.theta
        inputs = batch.inputs.float()
        if self.precision.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        result = meta_step(functional_forward(theta), dict(theta.named_parameters()), dict(theta.named_buffers()),
                           inputs, batch.targets, self.weight_net, self.lmcl_objective, lr, self.meta.times,
                           self.meta.momentum, self.meta.weight_decay, self.contrast.meta(batch),
                           self.meta.exact_hypergradient, self.meta.restore_bn)
        world = du.world_size()
        if world > 1:
            result.grads = [du.all_reduce_sum(g.detach().clone()) / world for g in result.grads]
        for group in self.weight_optimizer.param_groups:
            group["lr"] = lr
        apply_hypergradient(self.weight_net, self.weight_optimizer, result)
        self.meta_steps += 1

    @torch.no_grad()
    def evaluate(self) -> Tuple[Dict[str, Any], Optional[float]]:
        du.broadcast_buffers(self.model)
        test = evaluate_lmcl(self.model, self.eval_data, self.device, self.precision, self.max_eval_batches,
                             self.progress)
        test.pop("images")
        best_single = max(test["top1"])
        return {"test": test, "best_single_top1": best_single}, best_single

    def model_state(self) -> Dict[str, Any]:
        return {"model": self.model.cohort.state_dict(), "heads": self.model.heads.state_dict()}

    def load_model_state(self, ckpt: Dict[str, Any]) -> None:
        self.model.cohort.load_state_dict(ckpt["model"])
        self.model.heads.load_state_dict(ckpt["heads"])

    def extra_state(self, for_best: bool = False) -> Dict[str, Any]:
        """Aggregator and weight network always (evaluation reads the aggregator); the weight optimizer and
        the memory banks only in the latest checkpoint."""
        keep = not for_best
        return {"aggregator": self.model.aggregator.state_dict(), "weight_net": self.weight_net.state_dict(),
                "weight_optimizer": self.weight_optimizer.state_dict() if keep else None,
                "contrast": self.contrast.state_dict() if keep and hasattr(self.contrast, "state_dict") else None}

    def load_extra_state(self, extra: Dict[str, Any]) -> None:
        self.model.aggregator.load_state_dict(extra["aggregator"])
        self.weight_net.load_state_dict(extra["weight_net"])
        if extra.get("weight_optimizer") is not None:
            self.weight_optimizer.load_state_dict(extra["weight_optimizer"])
        if extra.get("contrast") is not None and hasattr(self.contrast, "load_state_dict"):
            self.contrast.load_state_dict(extra["contrast"])

    def format_epoch(self, record: Dict[str, Any]) -> str:
        agg = " ".join(f"{v:.2f}" for v in record["test"]["agg_top1"])
        line = super().format_epoch(record)
        head, sep, tail = line.partition(" | best")
        return f"{head} agg [{agg}]{sep}{tail}"

    def summary(self, state: RunState, records: List[Dict[str, Any]], epochs: int) -> Dict[str, Any]:
        """MCL's figures (from the final heads) plus the aggregated ones, and which head each uses."""
        out = super().summary(state, records, epochs)
        agg = records[-1]["test"].get("agg_top1") or [] if records else []
        out.update(method="lmcl", last_agg_top1=agg,
                   last_mean_agg_top1=sum(agg) / len(agg) if agg else None, heads=dict(HEAD_NOTES))
        return out

    def on_finished_dashboards(self, loop: Any) -> None:
        if not self.embeddings:
            return
        from utils.supervised import test_features

        features, labels, images = test_features(FinalStages(self.model.cohort), self.eval_data, self.device,
                                                 self.precision, self.embeddings)
        for i, f in enumerate(features):
            loop.logger.log_embedding(f"test_features_net{i}", f, labels, images, loop.state.epoch)

    def on_finished(self, loop: Any, summary: Dict[str, Any]) -> None:
        super().on_finished(loop, summary)
        agg = ", ".join(f"{v:.2f}" for v in summary["last_agg_top1"])
        loop.logger.text(f"(top-1 per network: its final head; the ensemble: mean of the final heads' logits); "
                         f"last-epoch aggregated top-1 per network (aggregator over all stages): [{agg}]")
