import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from detector.nets.googlenet import (
    AUX_LOSS_WEIGHT,
    GoogLeNet,
    GoogLeNetConfig,
    GoogLeNetOutputs,
    LocalResponseNorm,
    googlenet_loss,
)
from detector.nets.summary import TABLE1, summarize


@pytest.fixture
def tv_pair(spread):
    torch.manual_seed(0)
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    spread(tv, 1)
    for m in tv.modules():  # non-trivial batch-norm statistics so that a wrong eps or order shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = GoogLeNet(GoogLeNetConfig(variant="torchvision"))
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv.eval(), ours.eval()


def test_torchvision_variant_loads_strictly_and_matches_logits(tv_pair):
    tv, ours = tv_pair
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = tv(x), ours(x)
    assert a.std() > 0.1  # the comparison means something
    assert (a - b).abs().max().item() < 1e-4


def test_torchvision_variant_aux_heads_match(tv_pair):
    tv, ours = tv_pair
    with torch.no_grad():
        for name, ch in (("aux1", 512), ("aux2", 528)):
            feat = torch.randn(2, ch, 14, 14)
            assert torch.allclose(getattr(tv, name)(feat), getattr(ours, name)(feat), atol=1e-5)


def test_paper_variant_is_table1():
    net = GoogLeNet(GoogLeNetConfig(variant="paper"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, LocalResponseNorm) for m in net.modules()) == 2
    # true 5x5 convolutions in every Inception module, with the paper's filter counts
    assert net.inception3a.branch3[1].conv.kernel_size == (5, 5)
    assert net.inception5b.branch3[1].conv.out_channels == 128
    assert net.inception4a.branch2[1].conv.out_channels == 208
    assert net.dropout.p == 0.4 and net.aux1.dropout.p == 0.7
    assert net.maxpool4.kernel_size == 3
    # 22 layers with parameters on the inference path
    doc = summarize("paper")
    assert doc["total"]["depth"] == 22


def test_summary_rows_match_table1_shapes_and_exact_counts():
    doc = summarize("paper")
    rows = doc["rows"]
    assert [r["name"] for r in rows] == [t[0] for t in TABLE1]
    for r in rows:
        assert r["output"] == r["table_output"], r["name"]
    by = {r["name"]: r for r in rows}
    assert by["inception (3a)"]["params"] == 163_328  # 192*64 + 192*96 + 96*128*9 + 192*16 + 16*32*25 + 192*32
    assert by["inception (3a)"]["macs"] == 163_328 * 28 * 28
    assert by["convolution 7x7/2"]["params"] == 7 * 7 * 3 * 64
    assert by["convolution 7x7/2"]["macs"] == 7 * 7 * 3 * 64 * 112 * 112
    assert round(by["inception (5a)"]["macs"] / 1e6, 1) == 51.1
    assert doc["total"]["params"] == 6_990_272
    assert doc["total"]["macs"] == 1_582_671_872
    # the operations column agrees to 1% for every Inception row but 5a
    for r in rows:
        if r["name"].startswith("inception") and r["name"] != "inception (5a)":
            assert abs(r["macs"] / r["table_macs"] - 1) < 0.01, r["name"]


def test_torchvision_summary_counts_its_own_architecture():
    doc = summarize("torchvision")
    by = {r["name"]: r for r in doc["rows"]}
    # 3x3 instead of 5x5 in branch 3 of 3a: 16*32*9 instead of 16*32*25
    assert by["inception (3a)"]["params"] == 163_328 - 16 * 32 * 16
    net = GoogLeNet(GoogLeNetConfig(variant="torchvision", aux_logits=False))
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert doc["total"]["params"] == weights


def test_training_mode_returns_aux_outputs_and_eval_drops_them():
    net = GoogLeNet(GoogLeNetConfig(width=0.125, num_classes=7))
    x = torch.randn(2, 3, 224, 224)
    out = net.train()(x)
    assert isinstance(out, GoogLeNetOutputs)
    assert all(t.shape == (2, 7) for t in out)
    assert net.eval()(x).shape == (2, 7)
    no_aux = GoogLeNet(GoogLeNetConfig(width=0.125, aux_logits=False)).train()
    assert isinstance(no_aux(x), torch.Tensor)


def test_loss_weights_aux_heads_by_0_3():
    torch.manual_seed(0)
    out = GoogLeNetOutputs(torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5))
    y = torch.tensor([0, 1, 2, 3])
    expected = F.cross_entropy(out.logits, y) + 0.3 * (F.cross_entropy(out.aux_logits1, y)
                                                         + F.cross_entropy(out.aux_logits2, y))
    assert AUX_LOSS_WEIGHT == 0.3
    assert torch.allclose(googlenet_loss(out, y), expected)
    assert torch.allclose(googlenet_loss(out.logits, y), F.cross_entropy(out.logits, y))


@pytest.mark.parametrize("size", [96, 160])
def test_narrow_network_runs_at_small_inputs(size):
    net = GoogLeNet(GoogLeNetConfig(width=0.125)).train()
    out = net(torch.randn(2, 3, size, size))
    assert out.logits.shape == (2, 1000) and out.aux_logits1.shape == (2, 1000)


@pytest.mark.parametrize("bad", [dict(variant="resnet"), dict(num_classes=0), dict(width=0), dict(dropout=1.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GoogLeNetConfig(**bad)


def test_config_round_trips_and_rejects_unknown_fields():
    cfg = GoogLeNetConfig(variant="torchvision", width=0.5)
    assert GoogLeNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown arch field"):
        GoogLeNetConfig.from_dict({"variant": "paper", "depth": 3})


@pytest.mark.parametrize("size, beta, channels_last", [(5, 0.75, False), (5, 0.75, True), (4, 0.5, False)])
def test_lrn_equals_torch_reference(size, beta, channels_last):
    x = torch.randn(2, 9, 5, 6) * 40  # large values so the normalisation matters
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = nn.LocalResponseNorm(size, alpha=1e-2, beta=beta, k=2.0)(x)
    ours = LocalResponseNorm(size, alpha=1e-2, beta=beta, k=2.0)(x)
    assert (ref - ours).abs().max().item() < 1e-5 * ref.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LocalResponseNorm()(x.bfloat16()).dtype == torch.bfloat16
