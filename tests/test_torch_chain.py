"""Tests of the PyTorch adapter (smoothchain.torch_chain) and of ``certify`` on ``nn.Module``s.

* built-in models as ``nn.Sequential`` (on the meta device) certify exactly like their
  component lists, with the same shapes, at no real memory cost;
* nested ``nn.Sequential``, shape-only modules, batch norm with affine part, VGG-style modules
  (a torchvision ``vgg16()`` replica, and torchvision itself when it imports);
* balls around the weights (RH Cor. 4.5) with independently computed ||v*_l||;
* error messages (unsupported modules, the registry, bad shapes, bad options);
* a cheap soundness spot check: output norm and Jacobian norm (power iteration with
  ``torch.func.jvp``/``vjp``) at points of C stay below the certified m and l.
"""

from __future__ import annotations

import copy
import math
import os

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import functional_call, jvp, vjp  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import smoothchain  # noqa: E402
from smoothchain import (  # noqa: E402
    BilinearConstants,
    ChainError,
    ComponentConstants,
    Custom,
    build_chain,
    certify,
)
from smoothchain.components import (  # noqa: E402
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm,
    ChannelAffine,
    Conv2d,
    Flatten,
    Identity,
    Linear,
    ReLU,
    Softplus,
    Tanh,
    propagate_shapes,
)
from smoothchain.models import VGG16_CONFIG, builtin  # noqa: E402
from smoothchain.torch_chain import (  # noqa: E402
    REGISTRY,
    EntryBatchNorm,
    UnsupportedModuleError,
    components_from_module,
    leaf_modules,
    torch_module,
)

MODES = ("paper", "tight")
BN_EPS = 1e-3
# (name, batch size): VGG-16 at RH Sec. 5.1's batch 128, the small models at a small batch.
BUILTINS = [("vgg16", 128), ("vgg16-smooth", 128), ("vgg16-bn", 128), ("mlp", 16), ("cnn", 16)]


# --------------------------------------------------------------------------- helpers



def _rows(cert) -> list[tuple[float, float, float]]:
    """The per-layer table (m_l, l_l, L_l) followed by the chain's row and the objective."""
    rows = [(r.output_bound, r.lipschitz, r.smoothness) for r in cert.bounds.layers]
    rows.append((cert.bounds.output_bound, cert.bounds.lipschitz, cert.bounds.smoothness))
    rows.append((cert.objective.loss_lipschitz, cert.objective.loss_smoothness, cert.objective.smoothness))
    return rows


def _same(a: float, b: float, rel: float = 1e-12) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-300)


def assert_same_table(rows_a, rows_b, rel: float = 1e-12) -> None:
    assert len(rows_a) == len(rows_b), f"{len(rows_a)} rows vs {len(rows_b)}"
    for i, (ra, rb) in enumerate(zip(rows_a, rows_b)):
        assert all(_same(x, y, rel) for x, y in zip(ra, rb)), f"row {i}: {ra} != {rb}"


def _meta_module(components) -> nn.Sequential:
    with torch.device("meta"):
        return torch_module(components)


class _RealAllocations(TorchDispatchMode):
    """Records the number of elements of every non-meta tensor produced by an ATen op."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.numel())
        return out


def _vgg_features(pool=nn.MaxPool2d, act=nn.ReLU) -> nn.Sequential:
    layers, channels = [], 3
    for item in VGG16_CONFIG:
        if item == "M":
            layers.append(pool(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), act(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


class TorchvisionLikeVGG16(nn.Module):
    """A replica of ``torchvision.models.vgg16()`` (same attributes, leaves and forward)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = _vgg_features()
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _torchvision_vgg16() -> nn.Module:
    try:
        import torchvision
    except Exception as err:  # not installed, or e.g. a CUDA build of torchvision next to a CPU torch
        if os.environ.get("SMOOTHCHAIN_REQUIRE_TORCHVISION"):  # .ci/run's torchvision step: no skipping
            raise
        pytest.skip(f"torchvision does not import: {type(err).__name__}: {err}")
    return torchvision.models.vgg16(weights=None)


# --------------------------------------------------------------------------- 1. built-in models


@pytest.fixture(scope="module")
def meta_builtins():
    """Each built-in model as an nn.Sequential on the meta device (no real parameters)."""
    return {name: _meta_module(builtin(name, bn_eps=BN_EPS).components) for name, _ in BUILTINS}


@pytest.mark.parametrize("name,batch", BUILTINS, ids=[n for n, _ in BUILTINS])
def test_builtin_as_meta_module_certifies_like_the_component_list(meta_builtins, name, batch):
    module = meta_builtins[name]
    assert all(p.is_meta for p in module.parameters())
    model = builtin(name, bn_eps=BN_EPS)
    for mode in MODES:
        from_module = certify(module, input_shape=model.input_shape, batch_size=batch, mode=mode, radius=1.5)
        from_name = certify(name, batch_size=batch, mode=mode, radius=1.5, bn_eps=BN_EPS)
        assert len(from_module.bounds.layers) == len(from_name.bounds.layers)
        assert_same_table(_rows(from_module), _rows(from_name))


@pytest.mark.parametrize("name", [n for n, _ in BUILTINS])
def test_the_two_layer_views_agree_on_every_builtin(meta_builtins, name):
    """module_layers (oracles, DSGD) and the component chain's layers (check.layer_blocks) give
    every layer the same parameters; the reference groups named_parameters by module name."""
    from smoothchain.check import layer_blocks
    from smoothchain.torch_chain import leaf_modules, module_layers

    module = meta_builtins[name]
    per_module: dict[str, int] = {}
    for pname, p in module.named_parameters():
        owner = pname.rpartition(".")[0]
        per_module[owner] = per_module.get(owner, 0) + p.numel()
    parsed = module_layers(module)
    assert [sum(p.numel() for _, p in g.params) for g in parsed.layers] == list(per_module.values())
    assert [g.modules[0][0] for g in parsed.layers] == list(per_module)
    # the groups are consecutive runs of the one walk
    walk = [n for n, _ in leaf_modules(module)]
    assert [n for n, _ in parsed.pre] + [n for g in parsed.layers for n, _ in g.modules] == walk
    assert [p for g in parsed.layers for p in g.positions] == list(range(len(parsed.pre), len(walk)))
    blocks, _ = layer_blocks(module, builtin(name, bn_eps=BN_EPS).input_shape)
    sizes = [b.stop - b.start for b in blocks if b.stop > b.start]
    assert sizes == list(per_module.values())
    assert blocks[-1].stop == sum(per_module.values())


def test_module_layers_groups_by_parameter_ownership():
    from smoothchain.torch_chain import module_layers

    model = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Sequential(nn.Linear(4, 3), nn.Tanh()),
                          nn.BatchNorm1d(3), nn.Identity(), nn.Linear(3, 2, bias=False))
    parsed = module_layers(model)
    assert [n for n, _ in parsed.pre] == ["0", "1"]
    assert [[n for n, _ in g.modules] for g in parsed.layers] == [["2.0", "2.1"], ["3", "4"], ["5"]]
    assert [[n for n, _ in g.params] for g in parsed.layers] == [["weight", "bias"], ["weight", "bias"], ["weight"]]
    assert [g.positions for g in parsed.layers] == [(2, 3), (4, 5), (6,)]
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="used twice"):
        module_layers(nn.Sequential(shared, nn.Tanh(), shared))
    assert module_layers(nn.Sequential(nn.Tanh())).layers == ()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", MODES)
def test_builtin_with_real_weights_certifies_like_the_component_list(name, mode):
    torch.manual_seed(0)
    model = builtin(name)
    module = torch_module(model.components)
    from_module = certify(module, input_shape=model.input_shape, batch_size=8, mode=mode, input_norm=3.0)
    from_name = certify(name, batch_size=8, mode=mode, input_norm=3.0)
    assert_same_table(_rows(from_module), _rows(from_name))


@pytest.mark.parametrize("name,batch", BUILTINS, ids=[n for n, _ in BUILTINS])
def test_meta_shapes_match_the_components_shape_rules(meta_builtins, name, batch):
    model = builtin(name, bn_eps=BN_EPS)
    chain_m = components_from_module(meta_builtins[name], model.input_shape, batch)
    assert chain_m.components == model.components  # torch_module -> components_from_module round trip
    assert list(chain_m.shapes) == propagate_shapes(model.components, model.input_shape)
    assert len(chain_m.names) == len(chain_m.components) == len(chain_m.shapes) - 1


def test_vgg16_expected_shapes():
    shapes = propagate_shapes(builtin("vgg16").components, (3, 224, 224))
    assert shapes[0] == (3, 224, 224)
    assert (512, 7, 7) in shapes and (512 * 7 * 7,) in shapes
    assert shapes[-1] == (1000,)


def test_meta_module_certifies_without_real_weights():
    # centred at 0 (RH Prop. 4.4) the certificate depends on shapes only, not on the weights
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    cert = certify(net, input_shape=(4,), batch_size=2)
    assert_same_table(_rows(cert), _rows(certify([Linear(4, 3), Tanh()], input_shape=(4,), batch_size=2)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_module_dtype_does_not_matter(dtype):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).to(dtype)
    cert = certify(net, input_shape=(1, 8, 8), batch_size=2)
    reference = certify(net.float(), input_shape=(1, 8, 8), batch_size=2)
    assert_same_table(_rows(cert), _rows(reference))


def test_vgg16_at_batch_128_on_meta_allocates_no_real_memory(meta_builtins):
    # Real activations of the first conv alone would be 128 x 64 x 224 x 224 floats (1.6 GB).
    module = meta_builtins["vgg16"]
    spy = _RealAllocations()
    with spy:
        cert = certify(module, input_shape=(3, 224, 224), batch_size=128)
    assert spy.largest < 10_000, f"a real tensor of {spy.largest} elements was allocated"
    assert len(cert.bounds.layers) == 16
    assert all(p.is_meta for p in module.parameters())


def test_torch_module_builds_the_documented_modules():
    module = _meta_module(builtin("vgg16-bn", bn_eps=BN_EPS).components)
    kinds = [type(m) for m in module]
    assert kinds.count(nn.Conv2d) == 13 and kinds.count(nn.Linear) == 3
    assert kinds.count(nn.Softplus) == 15 and kinds.count(nn.AvgPool2d) == 5
    bns = [m for m in module if isinstance(m, EntryBatchNorm)]
    assert len(bns) == 13 and all(m.eps == BN_EPS for m in bns)
    assert isinstance(module[-1], nn.Softmax) and module[-1].dim == -1
    with pytest.raises(ChainError, match="EntryBatchNorm"):
        torch_module([BatchNorm(1e-5, over="channel")])


def test_entry_batchnorm_is_rh_eq_11():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    y = EntryBatchNorm(1e-2)(x)
    mean, var = x.mean(0, keepdim=True), x.var(0, unbiased=False, keepdim=True)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-2))


# --------------------------------------------------------------------------- 2. module structures


def test_nested_sequential_with_shape_only_modules():
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(), nn.AvgPool2d(2)),
        nn.Identity(),
        nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Sequential(nn.Linear(64, 10), nn.Tanh())),
        nn.Linear(10, 3),
    )
    names = [n for n, _ in leaf_modules(net)]
    assert names == ["0.0", "0.1", "0.2", "1", "2.0", "2.1", "2.2.0", "2.2.1", "3"]
    chain_m = components_from_module(net, (1, 8, 8), 4)
    assert chain_m.components == (
        Conv2d(1, 4, 3, 1, 1), Softplus(1.0), AvgPool2d(2), Identity(), Flatten(), Identity(),
        Linear(64, 10), Tanh(), Linear(10, 3),
    )
    assert chain_m.shapes == ((1, 8, 8), (4, 8, 8), (4, 8, 8), (4, 4, 4), (4, 4, 4), (64,), (64,), (10,), (10,), (3,))
    cert = certify(net, input_shape=(1, 8, 8), batch_size=4, mode="tight")
    assert [r.name for r in cert.bounds.layers] == ["0.0", "2.2.0", "3"]
    reference = certify(list(chain_m.components), input_shape=(1, 8, 8), batch_size=4, mode="tight")
    assert_same_table(_rows(cert), _rows(reference))


def test_batchnorm1d_affine_opens_a_channel_affine_layer():
    net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6, eps=1e-2), nn.Tanh(), nn.Linear(6, 2))
    m = 5
    chain_m = components_from_module(net, (8,), m)
    assert chain_m.components == (Linear(8, 6), BatchNorm(1e-2, "entry"), ChannelAffine(6), Tanh(), Linear(6, 2))
    assert chain_m.names[1:3] == ("1.norm", "1.affine")
    chain = build_chain(net, input_shape=(8,), batch_size=m)
    assert [layer.name for layer in chain.layers] == ["0", "1.affine", "3"]
    bn = chain.layers[0].nonlinear[0]
    assert (bn.bound, bn.lipschitz, bn.jacobian_at_zero) == (6 * m, 2 / math.sqrt(1e-2), 1 / math.sqrt(1e-2))
    assert chain.layers[1].bilinear == BilinearConstants(1.0, math.sqrt(m), 0.0, 0.0)
    assert [c.name for c in chain.layers[1].nonlinear] == ["tanh"]


def test_batchnorm2d_affine_normalises_per_channel():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4, affine=False))
    m = 3
    chain_m = components_from_module(net, (1, 8, 8), m)
    assert chain_m.components == (
        Conv2d(1, 4, 3), BatchNorm(1e-5, "channel"), ChannelAffine(4), ReLU(), BatchNorm(1e-5, "channel"),
    )
    chain = build_chain(net, input_shape=(1, 8, 8), batch_size=m, mode="tight")
    assert len(chain.layers) == 2
    assert chain.layers[1].bilinear == BilinearConstants(1.0, math.sqrt(m * 36), 0.0, 0.0)
    bn = chain.layers[0].nonlinear[0]  # d = 4 channels, m x 36 samples each
    assert math.isclose(bn.bound, math.sqrt(4 * m * 36))
    assert [c.name for c in chain.layers[1].nonlinear] == ["relu", "batchnorm"]


def test_vgg_style_module_with_and_without_avgpool():
    class Small(nn.Module):
        def __init__(self, avgpool):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.avgpool = avgpool
            self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(4 * 2 * 2, 5), nn.Softmax(dim=1))

    with_pool = Small(nn.AdaptiveAvgPool2d((2, 2)))
    assert [n for n, _ in leaf_modules(with_pool)] == [
        "features.0", "features.1", "features.2", "avgpool", "flatten", "classifier.0", "classifier.1", "classifier.2",
    ]
    chain_m = components_from_module(with_pool, (3, 8, 8), 2)
    assert chain_m.shapes[3:6] == ((4, 4, 4), (4, 2, 2), (16,))
    assert chain_m.components[3] == AdaptiveAvgPool2d((2, 2))
    without = Small(None)
    assert "avgpool" not in [n for n, _ in leaf_modules(without)]
    cert = certify(without, input_shape=(3, 4, 4), batch_size=2)
    assert [r.name for r in cert.bounds.layers] == ["features.0", "classifier.1"]
    assert cert.chain.layers[1].nonlinear[-1].name == "softmax"


# --------------------------------------------------------------------------- 3. torchvision VGG-16


@pytest.mark.parametrize("factory", [TorchvisionLikeVGG16, _torchvision_vgg16], ids=["replica", "torchvision"])
def test_torchvision_vgg16_on_meta(factory):
    with torch.device("meta"):
        module = factory()
    assert all(p.is_meta for p in module.parameters())
    chain_m = components_from_module(module, (3, 224, 224), 128)
    names = list(chain_m.names)
    # the adaptive pool is the identity at 224x224 and joins the 13th conv layer's non-linear part
    i = names.index("avgpool")
    assert chain_m.components[i] == AdaptiveAvgPool2d((7, 7))
    assert chain_m.shapes[i] == chain_m.shapes[i + 1] == (512, 7, 7)
    assert names[i + 1] == "flatten" and chain_m.shapes[i + 2] == (512 * 7 * 7,)
    assert chain_m.shapes[-1] == (1000,)
    dropouts = [c for n, c in zip(names, chain_m.components) if n in ("classifier.2", "classifier.5")]
    assert dropouts == [Identity(), Identity()]  # dropout: certified at evaluation, shape-only

    for mode in MODES:
        cert = certify(module, input_shape=(3, 224, 224), batch_size=128, mode=mode)
        layers = cert.chain.layers
        assert len(layers) == 16
        assert [layer.name for layer in layers][-3:] == ["classifier.0", "classifier.3", "classifier.6"]
        assert [c.name for c in layers[12].nonlinear] == ["relu", "maxpool", "adaptive-avgpool"]
        pool = layers[12].nonlinear[-1]
        assert (pool.bound, pool.lipschitz, pool.smoothness, pool.value_at_zero, pool.jacobian_at_zero) == (
            math.inf, 1.0, 0.0, 0.0, 1.0,
        )
        assert layers[-1].nonlinear == ()  # torchvision ends at the logits (no softmax)
        # the first 15 layers are RH's VGG-16 exactly; the last lacks RH's softmax
        reference = certify("vgg16", batch_size=128, mode=mode)
        assert_same_table(_rows(cert)[:15], _rows(reference)[:15])


def test_adaptive_avgpool_upsampling_replicates_entries():
    with torch.device("meta"):
        module = TorchvisionLikeVGG16(num_classes=10)
    chain = build_chain(module, input_shape=(3, 32, 32), batch_size=4)  # CIFAR: 1x1 -> 7x7
    pool = chain.layers[12].nonlinear[-1]
    assert pool.name == "adaptive-avgpool"
    assert math.isclose(pool.lipschitz, 7.0) and math.isclose(pool.jacobian_at_zero, 7.0)


# --------------------------------------------------------------------------- 4. around the weights


def _small_net() -> nn.Sequential:
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Softplus(), nn.AvgPool2d(2), nn.BatchNorm2d(3),
        nn.Flatten(), nn.Linear(12, 5, bias=False), nn.Tanh(), nn.Linear(5, 4), nn.Softmax(dim=-1),
    )


def _independent_norms(net) -> list[float]:
    """||v*_l|| = sqrt(||W||^2 + ||b||^2) of every bi-affine module, in float64."""
    out = []
    for mod in net:
        if isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            total = mod.weight.detach().double().pow(2).sum()
            if mod.bias is not None:
                total = total + mod.bias.detach().double().pow(2).sum()
            out.append(math.sqrt(float(total)))
    return out


def _exact_norms_at_weights(net, input_shape, m) -> list[tuple[float, float]]:
    """For each bi-affine module, by brute force in float64: the spectral norm of the dense matrix
    of z -> module(z) - module(0) on one example (the batch does not change it), and the norm
    of the bias broadcast over the batch's rows."""
    out, x = [], torch.zeros((1,) + tuple(input_shape), dtype=torch.float64)
    net = copy.deepcopy(net).double().train()
    for mod in net:
        if isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            if isinstance(mod, nn.BatchNorm2d):  # the affine part acts on the normalised input
                op, rows = float(mod.weight.detach().abs().max()), m * x[0, 0].numel()
            else:
                def lin(z, mod=mod):
                    return torch.nn.functional.linear(z, mod.weight) if isinstance(mod, nn.Linear) else \
                        torch.nn.functional.conv2d(z, mod.weight, None, mod.stride, mod.padding, mod.dilation)
                J = torch.autograd.functional.jacobian(lin, x).reshape(-1, x.numel())
                op = float(torch.linalg.matrix_norm(J, ord=2))
                rows = m * (lin(x)[0, 0].numel() if isinstance(mod, nn.Conv2d) else 1)
            off = 0.0 if mod.bias is None else math.sqrt(rows) * float(mod.bias.detach().norm())
            out.append((op, off))
        with torch.no_grad():
            x = mod(x if not isinstance(mod, nn.BatchNorm2d) else x.repeat(2, 1, 1, 1))[:1]
    return out


@pytest.mark.parametrize("mode", MODES)
def test_around_weights_follows_rh_cor_4_5(mode):
    net = _small_net()
    with torch.no_grad():
        net[3].weight.uniform_(0.5, 1.5)
        net[3].bias.normal_()
    norms = _independent_norms(net)
    m, radius, x_norm = 3, 0.7, 2.0
    kwargs = dict(input_shape=(2, 4, 4), batch_size=m, mode=mode, radius=radius, input_norm=x_norm)
    zero = build_chain(net, **kwargs)
    shifted = build_chain(net, around_weights=True, **kwargs)
    assert zero.centre == "zero" and shifted.centre == "weights"
    assert len(shifted.layers) == len(norms) == 4
    exact = _exact_norms_at_weights(net, (2, 4, 4), m)
    for base, layer, w, (op, off) in zip(zero.layers, shifted.layers, norms, exact):
        b, s = base.bilinear, layer.bilinear
        assert math.isclose(layer.weight_norm, w, rel_tol=1e-12)
        cor45_z, cor45_off = b.smoothness * w, b.weight_lipschitz * w
        if mode == "paper":  # RH Cor. 4.5 as printed
            assert math.isclose(s.input_lipschitz, b.input_lipschitz + cor45_z, rel_tol=1e-12)
            assert math.isclose(s.offset_norm, b.offset_norm + cor45_off, rel_tol=1e-12)
        else:  # the norms at the actual weights: sound (>= the exact ones) and never above Cor. 4.5's
            z_map, offset = s.input_lipschitz - b.input_lipschitz, s.offset_norm - b.offset_norm
            assert op * (1 - 1e-9) <= z_map <= cor45_z * (1 + 1e-12)
            assert math.isclose(offset, min(off, cor45_off), rel_tol=3e-9)  # NORM_MARGIN
        assert (s.smoothness, s.weight_lipschitz) == (b.smoothness, b.weight_lipschitz)
        assert layer.nonlinear == base.nonlinear
    cert = certify(net, around_weights=True, **kwargs)
    assert cert.chain == shifted
    # around the weights the bounds grow with ||v*||: they dominate the ones around 0
    cert0 = certify(net, **kwargs)
    assert cert.bounds.lipschitz >= cert0.bounds.lipschitz


def test_around_weights_of_a_builtin_name_uses_a_fresh_torch_module():
    torch.manual_seed(7)
    by_name = certify("mlp", batch_size=4, around_weights=True)
    torch.manual_seed(7)
    module = torch_module(builtin("mlp").components)
    by_module = certify(module, input_shape=(64,), batch_size=4, around_weights=True)
    assert_same_table(_rows(by_name), _rows(by_module))
    linears = [mod for mod in module if isinstance(mod, nn.Linear)]
    expected = [math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in mod.parameters())) for mod in linears]
    assert [layer.weight_norm for layer in by_name.chain.layers] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("param,value", [("weight", float("nan")), ("bias", float("inf"))])
def test_around_weights_rejects_non_finite_weights(param, value):
    net = _small_net()
    with torch.no_grad():
        getattr(net[7], param).view(-1)[0] = value
    with pytest.raises(ChainError, match=rf"'7\.{param}'"):
        certify(net, input_shape=(2, 4, 4), batch_size=2, around_weights=True)


def test_around_weights_needs_real_weights():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    with pytest.raises(ChainError, match="meta"):
        certify(net, input_shape=(4,), around_weights=True)


# --------------------------------------------------------------------------- 5. errors and the registry


class Softsign(nn.Module):
    """x -> x / (1 + |x|): bounded by 1 per entry, 1-Lipschitz, 2-smooth (|a''| <= 2)."""

    def forward(self, x):
        return x / (1 + x.abs())


def _softsign_converter(module, shape):
    return Custom(
        name="softsign",
        kind="nonlinear",
        constants_fn=lambda shape, m, mode: ComponentConstants(
            bound=math.sqrt(m * math.prod(shape)), lipschitz=1.0, smoothness=2.0, value_at_zero=0.0, jacobian_at_zero=1.0,
        ),
    )


@pytest.fixture
def registered_softsign():
    smoothchain.register_module(Softsign, _softsign_converter)
    try:
        yield
    finally:
        REGISTRY.pop(Softsign, None)


@pytest.mark.parametrize(
    "net,path,type_name",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.GELU()), "1", "GELU"),
        (nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Tanh(), Softsign())), "1.1", "Softsign"),
    ],
    ids=["gelu", "nested-custom"],
)
def test_unsupported_module_names_it_and_the_registry(net, path, type_name):
    with pytest.raises(UnsupportedModuleError) as info:
        certify(net, input_shape=(4,))
    message = str(info.value)
    assert f"'{path}'" in message and type_name in message
    assert "register_module" in message
    assert isinstance(info.value, ChainError)


def test_a_root_module_that_is_not_a_chain_is_a_graph():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    # not a chain: read by torch.fx as a graph (docs/graphs.md), the same certificate as the chain
    torch.manual_seed(0)
    block = Block()
    seq = nn.Sequential(block.fc, nn.Tanh())
    a, b = certify(block, input_shape=(4,), batch_size=3), certify(seq, input_shape=(4,), batch_size=3)
    assert a.bounds.smoothness == pytest.approx(b.bounds.smoothness, rel=1e-12)

    class Opaque(nn.Module):  # no registered part at all, and an operation without a rule
        def forward(self, x):
            return x.exp()

    with pytest.raises(ChainError, match=r"\.exp\(\) has no rule"):
        certify(Opaque(), input_shape=(4,))


def test_registered_custom_module_certifies(registered_softsign):
    net = nn.Sequential(nn.Linear(4, 6), Softsign(), nn.Linear(6, 2))
    cert = certify(net, input_shape=(4,), batch_size=3, mode="tight")
    act = cert.chain.layers[0].nonlinear
    assert len(act) == 1
    assert (act[0].bound, act[0].lipschitz, act[0].smoothness) == (math.sqrt(18), 1.0, 2.0)
    components = [Linear(4, 6), _softsign_converter(None, None), Linear(6, 2)]
    assert_same_table(_rows(cert), _rows(certify(components, input_shape=(4,), batch_size=3, mode="tight")))

    class Subclass(Softsign):  # subclasses use their nearest registered base
        pass

    sub = certify(nn.Sequential(nn.Linear(4, 6), Subclass(), nn.Linear(6, 2)), input_shape=(4,), batch_size=3, mode="tight")
    assert_same_table(_rows(sub), _rows(cert))


def test_register_module_rejects_non_modules_and_wrong_shapes():
    with pytest.raises(TypeError):
        smoothchain.register_module(int, _softsign_converter)

    class Halve(nn.Module):  # declares the identity shape but halves the last dimension
        def forward(self, x):
            return x[..., ::2]

    smoothchain.register_module(Halve, _softsign_converter)
    try:
        with pytest.raises(ChainError, match="'1'.*registered converter"):
            certify(nn.Sequential(nn.Linear(4, 4), Halve()), input_shape=(4,))
    finally:
        REGISTRY.pop(Halve, None)


@pytest.mark.parametrize(
    "net,shape,path",
    [
        (nn.Sequential(nn.Linear(784, 10)), (3, 32, 32), "'0'.*Linear"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (3, 32, 32), "'1'.*Linear"),
        (nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3)), nn.ReLU()), (3, 32, 32), "'0.0'.*Conv2d"),
    ],
    ids=["linear", "flatten-linear", "conv-channels"],
)
def test_wrong_input_shape_names_the_module(net, shape, path):
    with pytest.raises(ChainError, match=path) as info:
        certify(net, input_shape=shape)
    assert "--input-shape" in str(info.value)


def test_missing_input_shape_and_bad_options():
    net = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ChainError, match="input-shape"):
        certify(net)
    for radius in (-1.0, float("nan")):
        with pytest.raises(ChainError, match="radius"):
            certify(net, input_shape=(4,), radius=radius)
    with pytest.raises(ChainError, match="batch"):
        certify(net, input_shape=(4,), batch_size=0)
    with pytest.raises(ChainError, match="input shape"):
        components_from_module(net, (0,))
    with pytest.raises(ChainError, match="mode"):
        certify(net, input_shape=(4,), mode="loose")


@pytest.mark.parametrize(
    "softmax,shape",
    [(nn.Softmax(dim=1), (2, 6, 6)), (nn.Softmax(dim=0), (2, 6, 6)), (nn.Softmax(), (2, 6, 6)), (nn.Softmax(dim=0), (4,))],
    ids=["channels", "batch", "dim-none", "batch-1d"],
)
def test_softmax_off_the_last_dimension_raises(softmax, shape):
    net = nn.Sequential(nn.Conv2d(2, 2, 1), softmax) if len(shape) == 3 else nn.Sequential(nn.Linear(4, 4), softmax)
    with pytest.raises(UnsupportedModuleError, match="last dimension"):
        certify(net, input_shape=shape)


@pytest.mark.parametrize("dim", [1, -1])
def test_softmax_on_the_last_dimension_is_accepted(dim):
    cert = certify(nn.Sequential(nn.Linear(4, 10), nn.Softmax(dim=dim)), input_shape=(4,), batch_size=5)
    assert cert.chain.layers[0].nonlinear[0].name == "softmax"
    assert math.isclose(cert.bounds.output_bound, math.sqrt(5))


@pytest.mark.parametrize(
    "module",
    [nn.Conv2d(2, 4, 3, groups=2), nn.Conv2d(2, 2, 3, padding_mode="circular"), nn.Flatten(0), nn.AvgPool2d(2, divisor_override=3)],
    ids=["grouped", "circular", "flatten-batch", "divisor"],
)
def test_unsupported_module_options(module):
    with pytest.raises(UnsupportedModuleError):
        certify(nn.Sequential(module), input_shape=(2, 6, 6))


# --------------------------------------------------------------------------- 6. soundness spot check


def _on_spheres(params: dict[str, torch.Tensor], module: nn.Module, radius: float) -> dict[str, torch.Tensor]:
    """Scale each bi-affine module's (weight, bias) so that its norm is exactly ``radius``."""
    out = dict(params)
    for mod_name, mod in module.named_modules():
        names = [f"{mod_name}.{n}" for n, _ in mod.named_parameters(recurse=False)]
        if names:
            norm = torch.sqrt(sum(params[n].pow(2).sum() for n in names))
            for n in names:
                out[n] = params[n] * (radius / norm)
    return out


def _jacobian_norm(f, params, iterations: int = 40) -> float:
    """Largest singular value of the Jacobian of f at params (power iteration on J^T J)."""
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    _, pullback = vjp(f, params)
    sigma = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum(t.pow(2).sum() for t in v.values()))
        v = {k: t / norm for k, t in v.items()}
        _, jv = jvp(f, (params,), (v,))
        sigma = float(jv.norm())
        (v,) = pullback(jv)
    return sigma


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("radius,x_norm", [(1.0, 1.0), (2.5, 4.0)])
def test_output_and_jacobian_norms_stay_below_the_certificate(name, radius, x_norm):
    model = builtin(name)
    module = torch_module(model.components)
    batch = 6
    certs = {
        mode: certify(module, input_shape=model.input_shape, batch_size=batch, radius=radius, input_norm=x_norm, mode=mode)
        for mode in MODES
    }
    module = module.double()
    gen = torch.Generator().manual_seed(len(name) * 1000 + int(10 * radius))
    for trial in range(2):
        raw = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in module.named_parameters()}
        params = _on_spheres(raw, module, radius)
        x = torch.randn((batch,) + model.input_shape, generator=gen, dtype=torch.float64)
        x = x * (x_norm / x.norm())

        def psi(p):
            return functional_call(module, p, (x,))

        out_norm = float(psi(params).norm())
        jac_norm = _jacobian_norm(psi, params)
        assert jac_norm > 0
        for mode, cert in certs.items():
            assert out_norm <= cert.bounds.output_bound * (1 + 1e-9), (mode, trial, out_norm, cert.bounds.output_bound)
            assert jac_norm <= cert.bounds.lipschitz * (1 + 1e-9), (mode, trial, jac_norm, cert.bounds.lipschitz)
    # the balls are spheres here: the tight certificate is never looser than the paper one
    assert certs["tight"].bounds.lipschitz <= certs["paper"].bounds.lipschitz


def test_eval_mode_batch_norm_is_said_once_and_train_mode_is_silent():
    import warnings

    from smoothchain import certify
    from smoothchain.torch_chain import BatchStatisticsWarning

    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        a = certify(model, input_shape=(4,), batch_size=8)
    assert not [w for w in seen if issubclass(w.category, BatchStatisticsWarning)]
    with pytest.warns(BatchStatisticsWarning, match=r"batch norm '1' in evaluation mode") as caught:
        b = certify(model.eval(), input_shape=(4,), batch_size=8)
    assert len([w for w in caught if issubclass(w.category, BatchStatisticsWarning)]) == 1
    assert b.bounds.smoothness == a.bounds.smoothness  # the same certificate: batch statistics both times
