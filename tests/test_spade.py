"""SPADE baseline: every parameter trains, its loss switches change what runs, it learns, and its
pieces are the official ones (style encoder, KLD, VGG input, test-time z, init, optimiser).
Bit-exact equality with the official code is checked by the parity fixtures (tests/test_parity.py)."""
from __future__ import annotations

import pytest
import torch

from datasets import DATASETS
from datasets.base import DatasetSpec
from methods.base import BackboneSettings, MethodContext
from methods.registry import METHODS
from methods.spade.model import SPADEOptions


def setup(res=64, training=True, **opts):
    torch.manual_seed(0)
    ds = DATASETS.get("embedded")(DatasetSpec(name="embedded"), "train", res)
    ctx = MethodContext(data=ds.info, resolution=res, width=0.0625, training=training,
                        backbones=BackboneSettings(allow_untrained=True, download=False))
    opts.setdefault("encoder_size", 64)  # tiny runs: a 64x64 style input (4 layers) instead of the official 256
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
    assert {"G_gan", "G_feat", "G_vgg", "G_kld", "D_real", "D_fake", "D_total"} <= set(full.train_step(batch, 0))
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


def test_test_time_z_is_sampled_reproducibly_or_the_mean():
    """Official test.py samples z (reparameterize); ours draws it from a stream seeded with the trial
    seed that restarts at every evaluation. eval_z="mean" uses mu."""
    method, batch = setup()
    method.eval()
    first = method.generate(batch).output
    assert not torch.equal(first, method.generate(batch).output)  # the stream moves on within an evaluation
    method.train().eval()  # the next evaluation draws the same z again
    torch.manual_seed(123)  # and does not depend on the global stream
    assert torch.equal(first, method.generate(batch).output)
    mean, _ = setup(eval_z="mean")
    mean.load_state_dict(method.state_dict())
    mean.eval()
    out = mean.generate(batch).output
    assert torch.equal(out, mean.generate(batch).output) and not torch.allclose(out, first)
    mu, _ = mean.encoder(batch["exemplar"])
    torch.testing.assert_close(out, mean.generator(batch["cond"], mu))


def test_reconstruction_improves_with_training():
    method, batch = setup(eval_z="mean")

    def l1():
        method.eval()
        out = method.generate(dict(batch, exemplar=batch["image"])).output
        method.train()
        return (out - batch["image"]).abs().mean().item()

    start = l1()
    for step in range(15):
        method.train_step(batch, step)
    assert l1() < 0.7 * start


def test_style_encoder_is_the_official_conv_encoder():
    """norm_E spectralinstance: spectral-norm convs without bias, InstanceNorm without affine, the
    input resized to encoder_size (official 256: six stride-2 layers to 4x4), fc_mu/fc_var from 4x4."""
    import torch.nn.functional as F
    from torch import nn

    method, batch = setup(res=64, encoder_size=256)
    enc = method.encoder
    assert enc.num_layers == 6 and enc.fc_mu.in_features == 8 * method.ngf * 16
    for i in range(6):
        conv, norm = getattr(enc, f"layer{i + 1}")
        assert hasattr(conv, "weight_orig") and conv.bias is None and conv.stride == (2, 2)
        assert isinstance(norm, nn.InstanceNorm2d) and not norm.affine
    enc.eval()
    image = batch["image"]
    torch.testing.assert_close(enc(image)[0], enc(F.interpolate(image, size=(256, 256), mode="bilinear",
                                                                  align_corners=False))[0])
    assert setup(res=64)[0].encoder.num_layers == 4  # encoder_size 64


def test_kld_is_summed_over_batch_and_code_and_vgg_sees_the_raw_image():
    from methods.common.losses import kld_loss

    method, batch = setup()
    eps = torch.randn(2, method.z_dim)
    losses, gen = method.generator_losses(batch, eps)
    mu, logvar = gen["mu"], gen["logvar"]
    want = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    torch.testing.assert_close(losses["G_kld"], 0.05 * want)
    torch.testing.assert_close(kld_loss(mu, logvar), want)
    vgg = method.vgg_loss.vgg
    assert not vgg.imagenet_normalize
    x = batch["image"]
    torch.testing.assert_close(vgg(x)["relu1_1"], vgg._features[:2](x))  # the [-1, 1] image as it is
    normalised, _ = setup(vgg_imagenet_norm=True)
    assert normalised.vgg_loss.vgg.imagenet_normalize


def test_official_init_and_optimiser():
    """G, D and E get the official init_weights on the GPU path: xavier(0.02) in plain convs/linears
    with zero bias, spectral-norm weights keep torch's default; Adam TTUR (1e-4 / 4e-4, betas (0, 0.9))
    unless the sweep sets them."""
    from torch.nn.init import _calculate_fan_in_and_fan_out as fans

    method, _ = setup()

    def near(w, std):
        return abs(float(w.detach().std()) / std - 1) < 0.2

    def xavier(w):
        return 0.02 * (2 / sum(fans(w))) ** 0.5

    for layer in (method.decoder.head_0.norm_0.shared[0], method.decoder.conv_img, method.encoder.fc_mu,
                  method.netD.nets[0].layers[0][0], method.fc):
        assert near(layer.weight, xavier(layer.weight)) and torch.all(layer.bias == 0)
    for sn in (method.decoder.head_0.conv_0, method.encoder.layer2[0], method.netD.nets[1].layers[2][0]):
        w = sn.weight_orig  # torch's default kaiming-uniform(a=sqrt 5): std 1 / sqrt(3 fan_in)
        assert near(w, (3 * fans(w)[0]) ** -0.5)
    assert method.resolved == {"lr_g": 1e-4, "lr_d": 4e-4, "beta1": 0.0, "beta2": 0.9}
    g, d = method.optimizers()["g"], method.optimizers()["d"]
    assert g.defaults["lr"] == 1e-4 and d.defaults["lr"] == 4e-4 and g.defaults["betas"] == (0.0, 0.9)


def test_evaluation_only_builds_no_training_networks():
    method, batch = setup(training=False)
    assert method.netD is None and method.vgg_loss is None and method.optimizers() == {}
    method.eval()
    assert method.generate(batch).output.shape == (2, 3, 64, 64)


def test_discriminator_step_regenerates_the_fake():
    """The official D step encodes and generates again (no gradients) with a fresh z."""
    method, batch = setup()
    _, g = method.generator_losses(batch, torch.zeros(2, method.z_dim))
    _, d = method.discriminator_losses(batch, torch.ones(2, method.z_dim))
    assert not torch.allclose(g["fake"], d["fake"]) and not d["fake"].requires_grad


@pytest.mark.parametrize("mode,blocks", [("normal", 7), ("more", 7), ("most", 8)])
def test_num_upsampling_layers(mode, blocks):
    from methods.common.spade_blocks import SPADEResBlock

    method, batch = setup(res=128, num_upsampling_layers=mode, use_vae=False)
    assert method.sh == 128 // 2 ** {"normal": 5, "more": 6, "most": 7}[mode]
    assert sum(isinstance(m, SPADEResBlock) for m in method.decoder.children()) == blocks
    method.eval()
    assert method.generate(batch).output.shape == (2, 3, 128, 128)


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
    ctx = MethodContext(data=info, resolution=64, width=0.125, seed=0, total_steps=2, lr_g=1e-4, lr_d=4e-4, beta1=0.0,
                        beta2=0.9, backbones=BackboneSettings(allow_untrained=True, download=False))
    model = cls(cls.Options(**small), ctx)
    blocks = [m for m in model.modules() if isinstance(m, SPADEResBlock)]
    convs = [c for b in blocks for c in b.modules() if isinstance(c, PaddedConv2d)]
    assert blocks and len(convs) >= 5 * len(blocks) and {c.border for c in convs} == {padding}
