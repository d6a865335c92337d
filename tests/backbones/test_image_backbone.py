"""The image backbone through timm: registration of every mixer, timm's model interface, a
gradient step, grid-native mixers without a scan, bad input, and loading our own safetensors
through ``pretrained_cfg`` ``file``."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from conftest import fit_classifier
from safetensors.torch import save_file

from seqapps.backbones import GridScan, available_mixers, mixer_class
from seqapps.backbones.image import ImageBackbone, register_timm_models
from seqapps.errors import InputError

MIXERS = available_mixers()
# a quick mixer for the interface tests (any registered one would do)
MIXER = next((m for m in ("gla", "mamba2", "mlstm") if m in MIXERS), MIXERS[0] if MIXERS else None)
needs_mixer = pytest.mark.skipif(MIXER is None, reason="no mixer registered yet")
SMALL = dict(num_classes=10, in_chans=1, img_size=8, patch_size=2, embed_dim=32, depth=1)


def images(batch: int = 2, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


class GridCumulativeMean(torch.nn.Module):
    """A private grid-native test mixer: takes ``[B, *grid, C]`` as is (and records the shape it
    saw); a running mean along the last grid axis."""

    grid_native = True

    def __init__(self, dim: int):
        super().__init__()
        self.out = torch.nn.Linear(dim, dim)
        self.seen: list[tuple[int, ...]] = []

    def init_state(self, batch_size, device=None, dtype=None):
        return ()

    def forward(self, x, state=None):
        self.seen.append(tuple(x.shape))
        counts = torch.arange(1, x.shape[-2] + 1, dtype=x.dtype).unsqueeze(-1)
        return self.out(x.cumsum(-2) / counts), ()


def test_every_mixer_is_registered_with_timm_once():
    names = set(timm.list_models("seqapps_*_tiny"))
    assert {f"seqapps_{m}_tiny" for m in MIXERS} <= names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered twice
        assert register_timm_models() == [f"seqapps_{m}_tiny" for m in available_mixers()]


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_builds_and_runs_as_an_image_model(mixer):
    model = timm.create_model(f"seqapps_{mixer}_tiny", **SMALL).eval()
    assert model.scan == ("native" if mixer_class(mixer).grid_native else ("hilbert",))
    with torch.no_grad():
        logits = model(images())
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@needs_mixer
def test_timm_create_model_and_interface():
    model = timm.create_model(f"seqapps_{MIXER}_tiny", num_classes=10, in_chans=1, img_size=8, patch_size=2).eval()
    assert isinstance(model, ImageBackbone) and model.num_classes == 10
    assert model.stack.mixer_names == [MIXER] * model.stack.depth
    assert model.pretrained_cfg["architecture"] == f"seqapps_{MIXER}_tiny" and model.default_cfg is model.pretrained_cfg
    assert model.pretrained_cfg["first_conv"] == "patch_embed.proj" and model.pretrained_cfg["classifier"] == "head"
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 4, 4, model.num_features)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        torch.testing.assert_close(pooled, features.mean((1, 2)))
        logits = model(x)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(logits, model.get_classifier()(pooled))
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0, global_pool="max")
        torch.testing.assert_close(model(x), features.amax((1, 2)))
    assert isinstance(model.stack.blocks[0].mixer, GridScan)  # a 1-D mixer scans the patch grid


@needs_mixer
def test_a_few_gradient_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = timm.create_model(f"seqapps_{MIXER}_tiny", **SMALL)
    x, y = images(8), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    losses = fit_classifier(model, lambda: (x, y), steps=6)
    assert losses[-1] < 0.8 * losses[0], losses


@needs_mixer
def test_pretrained_local_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model(f"seqapps_{MIXER}_tiny", **SMALL).eval()
    # as a task's export: the backbone under a prefix, with a key of the task beside it
    path = tmp_path / "model.safetensors"
    save_file({**{f"net.{k}": v.contiguous() for k, v in source.state_dict().items()},
               "loss_weight": torch.ones(10)}, str(path))
    x = images()

    # the architecture (width, depth, patch, classes, channels, image size) is read from the file
    loaded = timm.create_model(f"seqapps_{MIXER}_tiny", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert (loaded.num_classes, loaded.in_chans, loaded.embed_dim) == (10, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))

    # another number of classes: a new head, the backbone loaded
    new_head = timm.create_model(f"seqapps_{MIXER}_tiny", pretrained=True, num_classes=3,
                                 pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert new_head(x).shape == (2, 3)
        torch.testing.assert_close(new_head.forward_head(new_head.forward_features(x), pre_logits=True),
                                   source.forward_head(source.forward_features(x), pre_logits=True))

    # three input channels: timm adapts the first convolution (grey images give the same features)
    rgb = timm.create_model(f"seqapps_{MIXER}_tiny", pretrained=True, in_chans=3,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(rgb(x.expand(-1, 3, -1, -1)), source(x), rtol=1e-4, atol=1e-4)


def test_grid_native_mixer_gets_the_grid_without_a_scan():
    model = ImageBackbone(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, mixer=GridCumulativeMean)
    assert model.scan == "native"
    assert all(isinstance(b.mixer, GridCumulativeMean) for b in model.stack.blocks)
    assert model(images()).shape == (2, 10)
    assert model.stack.blocks[0].mixer.seen == [(2, 4, 4, 16)]
    scanned = ImageBackbone(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, mixer=GridCumulativeMean,
                            scan="zorder", directions=2)
    assert scanned(images()).shape == (2, 10)
    assert scanned.stack.blocks[0].mixer.paths[0].seen == [(2, 16, 16)]  # flattened by the scan


@pytest.mark.skipif("lightnet" not in MIXERS, reason="LightNet not registered")
def test_lightnet_tiny_scans_natively():
    model = timm.create_model("seqapps_lightnet_tiny", **{**SMALL, "embed_dim": 32})
    assert model.scan == "native" and not isinstance(model.stack.blocks[0].mixer, GridScan)
    assert model(images()).shape == (2, 10)


@needs_mixer
def test_bad_input_is_one_line():
    model = ImageBackbone(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, mixer=MIXER)
    with pytest.raises(InputError, match=r"expected images of shape \[batch, 1, 8, 8\], got \[2, 1, 10, 10\]"):
        model(images(size=10))
    flat = next(m for m in MIXERS if not mixer_class(m).grid_native)
    with pytest.raises(InputError, match="scan: native needs grid-native mixers"):
        ImageBackbone(img_size=8, in_chans=1, embed_dim=32, depth=1, mixer=flat, scan="native")
    with pytest.raises(InputError, match="not a multiple of patch_size 3"):
        ImageBackbone(img_size=8, patch_size=3, mixer=MIXER)
    with pytest.raises(InputError, match="unknown scan"):
        ImageBackbone(img_size=8, mixer=MIXER, scan="spiral")
