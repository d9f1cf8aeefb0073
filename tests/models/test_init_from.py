"""--init-from: networks of a cohort start from state_dict files (ours, torchvision's, timm's, export's)."""
import pytest
import torch
import torchvision

from models import build_cohort, get_model
from models.init_from import init_networks, load_network, parse_init_from
from utils.checkpoint import CHECKPOINT_FORMAT
from utils.errors import CheckpointError, ConfigError


def saved(tmp_path, name, obj):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not any(k.startswith(p) for p in skip))


def test_parse_init_from(tmp_path):
    a, b = saved(tmp_path, "a.pth", {}), saved(tmp_path, "b=1.pth", {})
    assert parse_init_from([f"0={a}", f"1={b}"], 2) == {0: a, 1: b}
    assert parse_init_from([b], 3) == {0: b, 1: b, 2: b}  # "=" inside a path is not an index
    assert parse_init_from(None, 2) == {}
    with pytest.raises(ConfigError, match="network 2 does not exist"):
        parse_init_from([f"2={a}"], 2)
    with pytest.raises(ConfigError, match="names network 0 twice"):
        parse_init_from([f"0={a}", f"0={b}"], 2)
    with pytest.raises(ConfigError, match="none.pth does not exist"):
        parse_init_from([f"1={tmp_path}/none.pth"], 2)


def test_a_network_of_ours_starts_from_its_state_dict(tmp_path):
    torch.manual_seed(1)
    source = get_model("resnet32", 10)
    path = saved(tmp_path, "net.pth", {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}})
    cohort = build_cohort("resnet32,wrn_16_2", 2, 10)
    lines = init_networks(cohort, {0: path})
    assert lines == [f"network 0 (resnet32) starts from {path}"]
    assert same_weights(cohort.member(0), source)


def test_torchvision_keys_load_and_a_classifier_of_other_classes_stays_random(tmp_path):
    torchvision_net = torchvision.models.resnet18(num_classes=1000)
    path = saved(tmp_path, "tv.pth", torchvision_net.state_dict())
    net = get_model("resnet18", 10)
    fc_before = net.branch.fc.weight.clone()
    line = load_network(net, path, "network 1 (resnet18)")
    assert "classifier keeps its random initialisation" in line
    assert torch.equal(net.branch.fc.weight, fc_before)
    assert torch.equal(net.stem.conv1.weight, torchvision_net.conv1.weight)
    assert torch.equal(net.branch.layer4[1].bn2.running_var, torchvision_net.layer4[1].bn2.running_var)


def test_a_torchvision_member_takes_its_own_keys(tmp_path):
    reference = torchvision.models.mobilenet_v3_small(num_classes=10)
    net = get_model("mobilenet_v3_small", 10)
    load_network(net, saved(tmp_path, "m.pth", reference.state_dict()), "network 0")
    assert torch.equal(net.branch.fc.weight, reference.classifier[3].weight)
    assert torch.equal(net.stem.model.features[0][0].weight, reference.features[0][0].weight)


def test_a_timm_member_takes_timms_keys(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    reference = timm.create_model("convnext_atto", num_classes=10)
    cohort = build_cohort("timm:convnext_atto,resnet32", 2, 10)
    init_networks(cohort, {0: saved(tmp_path, "t.pth", reference.state_dict())})
    net = cohort.member(0)
    assert torch.equal(net.branch.fc.weight, reference.head.fc.weight)
    assert torch.equal(net.stem.model.stem[0].weight, reference.stem[0].weight)


def test_an_exported_network_loads(tmp_path):
    source = get_model("wrn_16_2", 10)
    path = saved(tmp_path, "e.pth", {"format": "mcl-network", "arch": "wrn_16_2", "num_classes": 10,
                                     "state_dict": source.state_dict(), "classifier_dropped": None})
    net = get_model("wrn_16_2", 10)
    load_network(net, path, "network 0")
    assert same_weights(net, source)


def test_another_architecture_is_one_error_naming_the_keys(tmp_path):
    path = saved(tmp_path, "r.pth", get_model("resnet32", 10).state_dict())
    with pytest.raises(CheckpointError, match=r"does not fit network 1 \(wrn_16_2\): missing .*\(\+\d+ more\); "
                                              r"unexpected .*; pass a state_dict of that architecture"):
        init_networks(build_cohort("resnet32,wrn_16_2", 2, 10), {1: path})


def test_a_wrong_shape_is_named(tmp_path):
    state = get_model("resnet32", 10).state_dict()
    state["stem.conv1.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(CheckpointError, match=r"shape of stem.conv1.weight \(8, 3, 3, 3\) in the file, "
                                              r"\(16, 3, 3, 3\) in the network"):
        load_network(get_model("resnet32", 10), saved(tmp_path, "s.pth", state), "network 0")


@pytest.mark.parametrize("obj,message", [
    ({"format": CHECKPOINT_FORMAT, "model": {}}, "checkpoint of a whole cohort; export one network first"),
    ({"epoch": 3}, r"does not hold a state_dict"),
    ([1, 2], r"does not hold a state_dict"),
])
def test_files_that_are_not_a_network_are_named(tmp_path, obj, message):
    with pytest.raises(CheckpointError, match=message):
        load_network(get_model("resnet32", 10), saved(tmp_path, "x.pth", obj), "network 0")


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "x.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a state_dict file torch.load can read"):
        load_network(get_model("resnet32", 10), str(path), "network 0")


def test_a_branched_cohort_refuses(tmp_path):
    path = saved(tmp_path, "r.pth", get_model("resnet32", 10).state_dict())
    with pytest.raises(ConfigError, match="branched cohort .* add --cohort independent"):
        init_networks(build_cohort("resnet32", 3, 10), {0: path})
