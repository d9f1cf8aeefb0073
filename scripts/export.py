"""Write one network of a trained cohort to a file that loads without any cohort code.

    python scripts/export.py checkpoint/RUN --out resnet32.pth          # best network of best.pth.tar
    python scripts/export.py checkpoint/RUN/checkpoint.pth.tar --net-index 1 --out net1.pth
    python scripts/export.py checkpoint/IMAGENET_RUN --torchvision --out resnet18_tv.pth
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
from typing import List, Optional  # noqa: E402

from models.export import export_network  # noqa: E402
from utils.args import HelpFormatter, parse_flags  # noqa: E402
from utils.checkpoint import atomic_save  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402

DESCRIPTION = """\
Export one network of a cohort checkpoint (main_cifar.py, main_imagenet.py,
main_moco_mcl.py, main_lincls.py) as a dict

  {"format", "arch", "num_classes", "state_dict", "source", "net_index",
   "classifier_dropped", "test_top1", "epoch", "script"}

format "mcl-network" (default): load with
  net = models.get_model(d["arch"], d["num_classes"]); net.load_state_dict(d["state_dict"])
  (strict; net(x) returns (logits, feature)). A network of a branched cohort gets
  the shared stem, so it runs alone; a network of an L-MCL run (--method lmcl)
  is written without its auxiliary branches (the plain network, its final head).
format "torchvision" (--torchvision, MoCo and linear-evaluation checkpoints): load with
  net = torchvision.models.get_model(d["arch"], num_classes=d["num_classes"])
  net.load_state_dict(d["state_dict"])       # strict
  or, when d["classifier_dropped"] names a module (--drop-fc, MoCo):
  torchvision.models.get_model(d["arch"]).load_state_dict(d["state_dict"], strict=False)
  reports only that module's weights missing (its fc stays freshly initialised).

Which network: --net-index K, else the one with the highest test top-1 at the
checkpoint's epoch in the metrics.jsonl beside it (for best.pth.tar: its best
epoch; for checkpoint.pth.tar: the last finished epoch); net 0 when there is no
metrics.jsonl (the script says so).
"""

EPILOG = """\
--torchvision works for the ImageNet ResNets (resnet18, resnet34: their parts are
named like torchvision's) and for torchvision models used as cohort members; not
for the CIFAR networks, which torchvision does not have.

MoCo pre-training checkpoints: the query encoder K is written in torchvision
format without its fc, which is MoCo's projection head (Linear(512, moco-dim), or
the MoCo v2 MLP with --mlp) and not a classifier: load it with strict=False into
torchvision.models.resnet18() (or any num_classes) and train the fc, as
main_lincls.py does. main_lincls.py checkpoints keep their trained fc and load
strictly with num_classes = d["num_classes"].
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export.py", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory (uses best.pth.tar, or checkpoint.pth.tar) or a checkpoint file")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the network")
    parser.add_argument("--net-index", type=int, default=None, metavar="K",
                        help="network K of the cohort (default: the best by metrics.jsonl)")
    parser.add_argument("--which", choices=("best", "last"), default="best",
                        help="for a run directory: best.pth.tar (default) or checkpoint.pth.tar (the latest)")
    parser.add_argument("--torchvision", action="store_true",
                        help="write torchvision key names (ImageNet ResNets, torchvision models)")
    parser.add_argument("--drop-fc", action="store_true",
                        help="leave out the classifier (its module is named in 'classifier_dropped'), "
                             "for fine-tuning on other classes")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_flags(build_parser(), argv)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UserError(f"cannot write {args.out}: directory {out_dir} does not exist")
    payload, notes = export_network(args.source, args.net_index, args.which, args.torchvision, args.drop_fc)
    atomic_save(payload, args.out)  # a read-only --out is one line (CheckpointError), before any note
    for note in notes:
        print(note, file=sys.stderr)
    classes = f", {payload['num_classes']} classes" if payload["num_classes"] else ""
    dropped = f", without {payload['classifier_dropped']}" if payload["classifier_dropped"] else ""
    source = os.path.relpath(payload["source"])
    source = payload["source"] if source.startswith("..") else source
    print(f"wrote {args.out}: net {payload['net_index']} ({payload['arch']}{classes}{dropped}) "
          f"of {source}, {payload['format']} format")
    return 0


if __name__ == "__main__":
    run_main(main)
