"""The kNN monitor (utils/knn.py): sharded over 2 gloo ranks it gives the numbers of one process."""
import torch
import torch.nn.functional as F

from tests.models.test_moco import tiny_model
from tests.moco_ddp_check import KNN_CLASSES, knn_monitor, knn_split
from utils import knn


def test_sharded_monitor_over_two_ranks_equals_one_process(moco_two_ranks):
    """Uneven shards (train 16 + 15, val 5 + 6 images); tests/moco_ddp_check.py ran the ranks."""
    single = knn_monitor(0, 1)
    assert len(single) == 2 and any(0 < v < 100 for v in single)  # a result that can differ
    for out in moco_two_ranks:
        assert out["knn_top1"] == single  # every rank gets the whole set's figures
        assert out["gathered_rows"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def test_monitor_counts_hits_over_the_whole_val_split():
    torch.manual_seed(0)
    model = tiny_model(number_net=1)
    train, val = knn_split(31, 1), knn_split(11, 2)
    encoder = model.encoders_q[0].eval()
    with torch.no_grad():
        feats = [F.normalize(knn.pooled_features(encoder, ds.tensors[0]), dim=1) for ds in (train, val)]
    pred = knn.weighted_knn_predict(feats[0], train.tensors[1], feats[1], KNN_CLASSES, k=5, t=0.1)
    expected = 100.0 * int((pred == val.tensors[1]).sum()) / len(val)
    loaders = [torch.utils.data.DataLoader(ds, batch_size=4) for ds in (train, val)]
    assert knn.knn_top1(model, (*loaders, KNN_CLASSES), torch.device("cpu"), 0, k=5, t=0.1) == [expected]
