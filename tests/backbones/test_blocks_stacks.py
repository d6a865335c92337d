"""Blocks and stacks: forward on the whole sequence = forward over pieces with the state carried
= ``step`` token by token, for a stack of two layers of every registered mixer (and a private
test mixer), hybrids, drop-path, options, bad input, export of the stack's ``step``, and the
stack config composing with Hydra."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqapps.backbones import Block, DropPath, Mixer, SequenceStack, StepModule, available_mixers, run_steps
from seqapps.backbones.block import GLU, MLP
from seqapps.errors import InputError

DIM, BATCH, T = 32, 2, 9
CONF = Path(__file__).resolve().parents[2] / "conf"


class CumulativeMean(Mixer):
    """A private causal test mixer: ``y_t = scale * W (x_1 + ... + x_t) / t``; state: the
    running sum ``[B, C]`` and the count ``[B, 1]``."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__(dim)
        self.scale = scale
        self.out = torch.nn.Linear(dim, dim)

    def init_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, self.dim, device=device, dtype=dtype),
                torch.zeros(batch_size, 1, device=device, dtype=dtype))

    def forward(self, x, state=None):
        self.check_input(x)
        total, count = state if state is not None else self.init_state(x.shape[0], x.device, x.dtype)
        sums = total.unsqueeze(1) + x.cumsum(1)
        counts = count.unsqueeze(1) + torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return self.scale * self.out(sums / counts), (sums[:, -1], counts[:, -1])

    def step(self, x_t, state):
        self.check_input(x_t, 2)
        self.check_state(state, x_t.shape[0])
        total, count = state[0] + x_t, state[1] + 1
        return self.scale * self.out(total / count), (total, count)


SPECS = [CumulativeMean, *available_mixers()]


def ids(spec) -> str:
    return spec if isinstance(spec, str) else spec.__name__


def sequence(seed: int = 1, length: int = T) -> torch.Tensor:
    return torch.randn(BATCH, length, DIM, generator=torch.Generator().manual_seed(seed))


def assert_whole_equals_pieces_equals_steps(module, x):
    with torch.no_grad():
        y, final = module(x)
        state, pieces = None, []
        for a, b in ((0, 1), (1, 5), (5, x.shape[1])):
            piece, state = module(x[:, a:b], state)
            pieces.append(piece)
        y_steps, step_state = run_steps(module, x)
    assert y.shape == x.shape
    torch.testing.assert_close(torch.cat(pieces, 1), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_steps, y, rtol=1e-4, atol=1e-5)
    assert len(final) == len(state) == len(step_state) == len(module.init_state(BATCH, device="meta"))
    for a, b, c in zip(final, state, step_state):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_two_layer_stack_whole_equals_pieces_equals_steps(spec):
    torch.manual_seed(0)
    stack = SequenceStack(DIM, depth=2, mixer=spec, drop_path=0.2).eval()
    x = sequence()
    assert_whole_equals_pieces_equals_steps(stack, x)
    # the flat state splits into the layers' own states and joins back
    state = stack.init_state(BATCH)
    layers = stack.split_state(state)
    assert [len(s) for s in layers] == list(stack.state_sizes)
    assert all(len(s) == len(b.init_state(BATCH)) for s, b in zip(layers, stack.blocks))
    assert stack.join_state(layers) == state


def test_hybrid_stack_alternates_mixers_and_routes_their_kwargs():
    other = next((m for m in ("gla", "attention", "mamba2") if m in available_mixers()), None)
    pattern = [CumulativeMean, other] if other else [CumulativeMean, CumulativeMean]
    torch.manual_seed(0)
    stack = SequenceStack(DIM, depth=4, mixer=pattern, mixer_kwargs={"CumulativeMean": {"scale": 3.0}}).eval()
    expected = [type(stack.blocks[0].mixer), type(stack.blocks[1].mixer)] * 2
    assert [type(b.mixer) for b in stack.blocks] == expected
    assert stack.mixer_names[0] == "CumulativeMean" and stack.blocks[2].mixer.scale == 3.0
    if other:
        assert stack.mixer_names[1] == other
    assert_whole_equals_pieces_equals_steps(stack, sequence())
    with pytest.raises(InputError, match="repeat evenly over depth=3"):
        SequenceStack(DIM, depth=3, mixer=pattern)


def test_shared_mixer_kwargs_reach_every_layer():
    stack = SequenceStack(DIM, depth=2, mixer=CumulativeMean, mixer_kwargs={"scale": 0.5})
    assert [b.mixer.scale for b in stack.blocks] == [0.5, 0.5]


def test_drop_path_is_random_in_training_and_off_in_eval():
    drop = DropPath(0.5)
    ones = torch.ones(400, 3)
    dropped = drop.train()(ones)
    kept_rows = dropped[:, 0] != 0
    assert 0 < kept_rows.sum() < 400  # some samples dropped, some kept
    torch.testing.assert_close(dropped[kept_rows], torch.full_like(dropped[kept_rows], 2.0))
    assert torch.equal(drop.eval()(ones), ones)

    torch.manual_seed(0)
    stack = SequenceStack(DIM, depth=3, mixer=CumulativeMean, drop_path=0.4)
    assert [b.drop_path.rate for b in stack.blocks] == pytest.approx([0.0, 0.2, 0.4])
    x = sequence()
    stack.eval()
    with torch.no_grad():
        assert torch.equal(stack(x)[0], stack(x)[0])
        stack.train()
        torch.manual_seed(1)
        outputs = [stack(x)[0] for _ in range(4)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("norm, norm_type", [("rmsnorm", torch.nn.RMSNorm), ("layernorm", torch.nn.LayerNorm)])
@pytest.mark.parametrize("ffn, ffn_type", [("glu", GLU), ("mlp", MLP), ("none", type(None))])
def test_block_options(norm, norm_type, ffn, ffn_type):
    block = Block(DIM, CumulativeMean, norm=norm, ffn=ffn, mlp_ratio=2.0).eval()
    assert isinstance(block.mixer_norm, norm_type) and isinstance(block.ffn, ffn_type)
    x = sequence()
    y, state = block(x)
    # the residual unit by hand
    mixed, _ = block.mixer(block.mixer_norm(x))
    expected = x + mixed
    if block.ffn is not None:
        expected = expected + block.ffn(block.ffn_norm(expected))
    torch.testing.assert_close(y, expected)
    assert_whole_equals_pieces_equals_steps(block, x)


def test_mixer_given_as_config_mapping():
    name = "gla"
    block = Block(DIM, {"name": name})
    assert type(block.mixer).name == name


def test_bad_input_is_one_line():
    stack = SequenceStack(DIM, depth=2, mixer=CumulativeMean)
    with pytest.raises(InputError, match=f"{DIM} channels, got \\[2, 5, {DIM + 1}\\]"):
        stack(torch.randn(BATCH, 5, DIM + 1))
    with pytest.raises(InputError, match="state must be a tuple of 4 tensors .* got 2 tensors"):
        stack(sequence(), stack.init_state(BATCH)[:2])
    with pytest.raises(InputError, match="state"):
        stack.step(torch.randn(BATCH, DIM), stack.init_state(BATCH + 1))
    with pytest.raises(InputError, match="unknown norm 'batchnorm'"):
        Block(DIM, CumulativeMean, norm="batchnorm")
    with pytest.raises(InputError, match="unknown ffn 'moe'"):
        Block(DIM, CumulativeMean, ffn="moe")
    with pytest.raises(InputError, match="unknown mixer 'nope'"):
        SequenceStack(DIM, mixer="nope")


def test_stack_step_exports_with_its_flat_state():
    torch.manual_seed(0)
    stack = SequenceStack(DIM, depth=2, mixer=CumulativeMean).eval()
    step = StepModule(stack).eval()
    state = tuple(torch.rand_like(s) + 1 for s in stack.init_state(BATCH))
    x_t = torch.randn(BATCH, DIM)
    with torch.no_grad():
        expected = step(x_t, *state)
    exported = torch.export.export(step, (x_t, *state))
    got = exported.module()(x_t, *state)
    assert len(got) == 1 + len(state)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("config", ["seq", "image"])
def test_backbone_configs_compose_with_any_mixer_yaml(config):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    yamls = sorted(p.stem for p in (CONF / "backbone" / "mixer").glob("*.yaml"))
    usable = [n for n in ("gla", "mamba2", "mlstm", *yamls) if n in yamls and n in available_mixers()]
    assert usable, "no mixer YAML names a registered mixer"
    overrides = [f"backbone/mixer={usable[0]}", "backbone.depth=1", "backbone.embed_dim=32" if config == "image"
                 else "backbone.dim=32"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=f"backbone/{config}", overrides=overrides)
    assert cfg.backbone.mixer.name == usable[0]
    model = instantiate(cfg.backbone)
    stack = model if config == "seq" else model.stack
    assert stack.mixer_names == [usable[0]]
    if config == "seq":
        y, _ = model(torch.randn(1, 3, 32))
        assert y.shape == (1, 3, 32)
    else:
        assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)


class PositionAware(CumulativeMean):
    """A test mixer that records the layer position the stack gives it."""

    def __init__(self, dim: int, layer_idx: int = -1, num_layers: int = -1, column_shape=()):
        super().__init__(dim)
        self.layer_idx, self.num_layers, self.column_shape = layer_idx, num_layers, tuple(column_shape)


def test_stack_gives_layer_position_to_mixers_that_take_it():
    stack = SequenceStack(DIM, depth=3, mixer=PositionAware, mixer_context={"column_shape": (4,), "unused": 1})
    assert [(b.mixer.layer_idx, b.mixer.num_layers, b.mixer.column_shape) for b in stack.blocks] == \
        [(0, 3, (4,)), (1, 3, (4,)), (2, 3, (4,))]
    # a mixer that declares none of them is built as before (no unexpected keyword)
    plain = SequenceStack(DIM, depth=2, mixer=CumulativeMean, mixer_context={"column_shape": (4,)})
    assert [type(b.mixer) for b in plain.blocks] == [CumulativeMean, CumulativeMean]
    # in a hybrid the count is the stack's depth, the index the layer's; explicit kwargs win
    hybrid = SequenceStack(DIM, depth=4, mixer=[PositionAware, CumulativeMean],
                           mixer_kwargs={"PositionAware": {"num_layers": 7}})
    assert [(b.mixer.layer_idx, b.mixer.num_layers) for b in hybrid.blocks[::2]] == [(0, 7), (2, 7)]


def test_rwkv6_layers_get_the_papers_depth_dependent_initialisation():
    from seqapps.backbones import build_mixer

    stack = SequenceStack(DIM, depth=3, mixer={"name": "rwkv6", "layer_idx": 0, "num_layers": 1})
    decays = [block.mixer.decay_bias.detach() for block in stack.blocks]
    for i, decay in enumerate(decays):
        torch.testing.assert_close(decay, build_mixer("rwkv6", DIM, layer_idx=i, num_layers=3).decay_bias.detach())
    # deeper layers forget more slowly: w = exp(-exp(decay_bias)) nearer 1
    assert decays[2].mean() < decays[0].mean() - 0.5
    # the image backbone's stack (each mixer inside a GridScan) gets them as well
    from seqapps.backbones.image import ImageBackbone

    image = ImageBackbone(img_size=8, patch_size=2, in_chans=1, embed_dim=DIM, depth=2, mixer="rwkv6")
    last = image.stack.blocks[1].mixer.paths[0]
    torch.testing.assert_close(last.decay_bias.detach(),
                               build_mixer("rwkv6", DIM, layer_idx=1, num_layers=2).decay_bias.detach())


def test_options_for_a_mixer_the_stack_does_not_use_are_left_out():
    """A config may carry per-mixer options (``mixer_kwargs: {chimera: {...}}``) while another
    mixer is chosen: they go to no layer instead of failing the build."""
    stack = SequenceStack(DIM, depth=1, mixer="mamba", mixer_kwargs={"chimera": {"d_state": 4}, "mamba": {"d_state": 8}})
    assert stack.blocks[0].mixer.d_state == 8


def test_hgrn2_lower_bounds_grow_with_depth():
    """HGRN-2's forget-gate lower bound: layer_idx / num_layers from the stack (the paper's
    schedule at initialisation), unless given."""
    stack = SequenceStack(DIM, depth=4, mixer={"name": "hgrn2"})
    assert [block.mixer.lower_bound for block in stack.blocks] == [0.0, 0.25, 0.5, 0.75]
    fixed = SequenceStack(DIM, depth=2, mixer={"name": "hgrn2", "lower_bound": 0.1})
    assert [block.mixer.lower_bound for block in fixed.blocks] == [0.1, 0.1]


@pytest.mark.parametrize("mixer", ["lightnet", "chimera", ("lightnet", "chimera")], ids=str)
@pytest.mark.parametrize("pool", ["avg", "max", ""])
def test_native_image_backbone_streams_column_by_column(mixer, pool):
    """Grid-native layers learn the column height from the stack's mixer_context, so the image
    backbone streams columns of patches; after the last column the logits are forward's."""
    from seqapps.backbones.image import ImageBackbone

    torch.manual_seed(0)
    model = ImageBackbone(img_size=(8, 6), patch_size=2, in_chans=1, embed_dim=16, depth=2,
                          mixer=list(mixer) if isinstance(mixer, tuple) else mixer, global_pool=pool).eval()
    assert model.streams
    images = torch.randn(3, 1, 8, 6)
    columns = model.image_columns(images)
    assert columns.shape == (3, 3, 1, 8, 2)
    with torch.no_grad():
        whole = model(images)
        streamed, _ = run_steps(model, columns)
    if pool:
        torch.testing.assert_close(streamed[:, -1], whole, rtol=1e-4, atol=1e-5)
    else:  # no pooling: the logits of each patch, column by column
        torch.testing.assert_close(streamed.movedim(1, 2), whole, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"one column of patches of shape \[batch, 1, 8, 2\]"):
        model.step(images, model.init_state(3))
