"""SPADE baseline: every parameter trains, its loss switches change what runs, and it learns."""
from __future__ import annotations

import pytest
import torch

from datasets import DATASETS
from datasets.base import DatasetSpec
from methods.base import BackboneSettings, MethodContext
from methods.registry import METHODS
from methods.spade.model import SPADEOptions


def setup(res=64, **opts):
    torch.manual_seed(0)
    ds = DATASETS.get("embedded")(DatasetSpec(name="embedded"), "train", res)
    ctx = MethodContext(data=ds.info, resolution=res, width=0.0625, beta2=0.9,
                        backbones=BackboneSettings(allow_untrained=True, download=False))
    method = METHODS.get("spade")(SPADEOptions(**opts), ctx)
    batch = torch.utils.data.default_collate([ds[i] for i in range(2)])
    return method, batch


def test_gradients_reach_every_parameter():
    method, batch = setup()
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    method.train_step(batch, 0)
    assert [n for n, p in method.named_parameters() if p.grad is None] == []
    unchanged = [n for n, p in method.named_parameters() if torch.equal(before[n], p.detach())]
    # A PatchGAN's last bias can get an exactly-zero hinge gradient (all real and fake logits
    # inside the margin): d/db [mean relu(1 - r) + mean relu(1 + f)] = -1 + 1.
    assert all(n.startswith("netD.") and n.endswith(".bias") for n in unchanged), unchanged


def test_loss_switches_change_what_runs():
    full, batch = setup()
    assert {"G_gan", "G_feat", "G_vgg", "G_kld", "D_total"} <= set(full.train_step(batch, 0))
    assert full.provenance["vgg19_loss"] == "untrained(seed=0)"
    no_vgg, _ = setup(lambda_vgg=0)
    assert "G_vgg" not in no_vgg.train_step(batch, 0) and no_vgg.vgg_loss is None
    plain, _ = setup(use_vae=False)
    assert "G_kld" not in plain.train_step(batch, 0) and not hasattr(plain, "encoder")


def test_generate_uses_the_exemplar():
    method, batch = setup()
    method.eval()
    a = method.generate(batch).output
    swapped = dict(batch, exemplar=batch["exemplar"].flip(0))
    b = method.generate(swapped).output
    assert a.shape == (2, 3, 64, 64) and not torch.allclose(a, b)


def test_reconstruction_improves_with_training():
    method, batch = setup()

    def l1():
        method.eval()
        with torch.no_grad():
            out = method._generate(batch["cond"], batch["image"], sample=False)[0]
        method.train()
        return (out - batch["image"]).abs().mean().item()

    start = l1()
    for step in range(15):
        method.train_step(batch, step)
    assert l1() < 0.7 * start


def test_missing_vgg_weights_is_a_clear_error(tmp_path, monkeypatch):
    import pytest

    from methods.common.weights import MissingWeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ds = DATASETS.get("embedded")(DatasetSpec(name="embedded"), "train", 64)
    ctx = MethodContext(data=ds.info, resolution=64, width=0.0625,
                        backbones=BackboneSettings(allow_untrained=False, download=False, weights_dir=str(tmp_path)))
    with pytest.raises(MissingWeightsError, match="(?s)vgg19-dcbb9e9d.pth.*download.pytorch.org"):
        METHODS.get("spade")(SPADEOptions(), ctx)


def test_reflect_padding_blocks_equal_explicit_reflection_pad():
    """CoCosNet's blocks pad by reflection (ReflectionPad2d(1) + conv, padding 0): known answer
    against the explicit form, and the CoCosNet family builds its blocks that way, SPADE does not."""
    import torch.nn.functional as F

    from methods.common.spade_blocks import SPADE, SPADEResBlock

    torch.manual_seed(0)
    x, seg = torch.randn(2, 8, 6, 6), torch.randn(2, 3, 6, 6)
    spade = SPADE(8, 3, hidden=5, norm="instance", padding="reflect")
    h = F.relu(F.conv2d(F.pad(seg, (1, 1, 1, 1), mode="reflect"), spade.shared[0].weight, spade.shared[0].bias))
    gamma = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), spade.gamma.weight, spade.gamma.bias)
    beta = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), spade.beta.weight, spade.beta.bias)
    want = F.instance_norm(x) * (1 + gamma) + beta
    torch.testing.assert_close(spade(x, seg), want, rtol=1e-5, atol=1e-5)
    zeros = SPADE(8, 3, hidden=5, norm="instance")
    zeros.load_state_dict(spade.state_dict())  # same parameters, other padding: other border values
    assert not torch.allclose(zeros(x, seg)[..., 0, :], want[..., 0, :])
    block = SPADEResBlock(8, 4, 3, hidden=5, norm="positional", padding="reflect")
    assert block.conv_0.border == block.conv_1.border == "reflect"
    one = torch.randn(1, 8, 1, 1)  # a 1x1 map cannot be reflected: its one value is repeated
    conv = block.conv_0
    torch.testing.assert_close(conv(one), F.conv2d(one.expand(1, 8, 3, 3), conv.weight, conv.bias))


@pytest.mark.parametrize("name,padding", [("spade", "zeros"), ("cocosnet", "reflect"), ("cocosnet_v2", "reflect"),
                                          ("midms", "reflect")])
def test_spade_block_padding_per_method(name, padding):
    """SPADE pads its SPADE blocks with zeros; CoCosNet, v2 and MIDMs (CoCosNet's architecture.py) reflect."""
    import methods  # noqa: F401
    from datasets.base import DatasetSpec
    from datasets.embedded import EmbeddedDataset
    from methods.base import BackboneSettings, MethodContext
    from methods.common.spade_blocks import PaddedConv2d, SPADEResBlock
    from methods.registry import METHODS

    cls = METHODS.get(name)
    small = {"midms": dict(unet_channel_mult=(1, 2), unet_attention_levels=(1,), ae_channels=64)}.get(name, {})
    info = EmbeddedDataset(DatasetSpec(name="embedded", variant="mask"), "train", 64).info
    ctx = MethodContext(data=info, resolution=64, width=0.125, seed=0, total_steps=2,
                        backbones=BackboneSettings(allow_untrained=True, download=False))
    model = cls(cls.Options(**small), ctx)
    blocks = [m for m in model.modules() if isinstance(m, SPADEResBlock)]
    convs = [c for b in blocks for c in b.modules() if isinstance(c, PaddedConv2d)]
    assert blocks and len(convs) >= 5 * len(blocks) and {c.border for c in convs} == {padding}
