"""Recursions of RH Prop. 4.3/4.4, Lemma D.2, Cor. 4.5 and Prop. 4.2 against an independent
reference (tests/reference_prop44.py) and hand-computed examples; spec parsing; the
``smoothchain certify --spec FILE --json`` path.

Comparisons: inf == inf; finite values with relative tolerance 1e-9.  The only other case
accepted is float overflow, where the two implementations multiply the same factors in a
different order and one of them reaches inf while the other is already astronomically large
(> 1e280); "inf" inputs never reach that regime by themselves.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference_prop44 import BILINEAR_KEYS, NONLINEAR_KEYS, lemma_d2, num, prop42, prop43, prop44_layers, times
from smoothchain.chain import BilinearConstants, Chain, ChainError, ComponentConstants, Layer
from smoothchain.objective import LossConstants, objective_bounds
from smoothchain.recursion import chain_bounds, composite_bounds, generic_chain_bounds
from smoothchain.spec import SpecError, load_spec, parse_spec, spec_to_dict

INF = math.inf
HUGE = 1e280


def same(a: float, b: float, rel: float = 1e-9) -> bool:
    if math.isnan(a) or math.isnan(b):
        return False
    if a == b:
        return True
    if math.isinf(a) or math.isinf(b):
        return min(a, b) > HUGE  # overflow reached in a different multiplication order
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def assert_rows(got, expected, context=""):
    assert len(got) == len(expected), context
    for i, (g, e) in enumerate(zip(got, expected), start=1):
        for what, x, y in zip(("m", "l", "L"), g, e):
            assert same(x, y), f"layer {i} {what}: library {x!r} != reference {y!r} {context}"


def library_rows(bounds):
    return [(r.output_bound, r.lipschitz, r.smoothness) for r in bounds.layers]


# --------------------------------------------------------------------------- strategies
# Generation cost dominates on a slow machine, so constants are drawn from a fixed pool
# (cheap sampled_from) -- zero (float and int), small floats, large floats and "inf" in several
# spellings, zeros and infs frequent so that 0 * inf cases occur -- and each spec then gets one
# drawn float that jitters every finite non-zero constant by a factor in [0.5, 2).
ZEROS = [0.0, 0]
SMALL = [1e-4, 0.003, 0.1234567, 0.25, 0.5, 0.7071067811865476, 1.0]
LARGE = [2.0, 3.7, 17.0, 1e3, 123456.789, 1e6]
INFS = ["inf", "inf", "Infinity", "INF"]
FINITE_POOL = ZEROS + SMALL + LARGE
POOL = FINITE_POOL + INFS
constant = st.sampled_from(POOL)
finite_constant = st.sampled_from(FINITE_POOL)
radius_st = finite_constant
input_norm_st = constant
GOLDEN = 0.6180339887498949


def _jitter(doc, seed: float):
    """Multiply every finite non-zero float in ``doc`` by 2 ** (u - 1), u in [0, 1) from ``seed``."""
    counter = [0]

    def walk(x):
        if isinstance(x, dict):
            return {k: (walk(v) if k != "name" else v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, float) and x != 0.0:
            counter[0] += 1
            return x * 2.0 ** (((seed + counter[0] * GOLDEN) % 1.0) - 1.0)
        return x

    return walk(doc)


def jittered(strategy):
    return st.tuples(strategy, st.floats(min_value=0.0, max_value=1.0)).map(lambda t: _jitter(t[0], t[1]))


component_st = st.fixed_dictionaries({k: constant for k in NONLINEAR_KEYS})


def _layer_st(weight_norms: bool):
    keys = {"bilinear": st.fixed_dictionaries({k: constant for k in BILINEAR_KEYS}),
            "nonlinear": st.lists(component_st, max_size=3)}
    if weight_norms:
        keys["weight_norm"] = constant
    return st.fixed_dictionaries(keys, optional={"name": st.sampled_from(["conv1", "fc", "x"])})


def spec_st(weight_norms: bool = False, max_depth: int = 6):
    """Random spec documents (DESIGN.md format): depth 1..max_depth, 0-3 components per layer."""
    raw = st.fixed_dictionaries({
        "input_norm": input_norm_st,
        "radius": radius_st,
        "layers": st.lists(_layer_st(weight_norms), min_size=1, max_size=max_depth),
        "loss": st.fixed_dictionaries({"lipschitz": constant, "smoothness": constant}),
        "regularization_smoothness": finite_constant,
    })
    return jittered(raw)


# --------------------------------------------------------------------------- 1. Prop. 4.4
@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(spec_st())
def test_prop44_matches_reference(spec):
    parsed = parse_spec(copy.deepcopy(spec))
    got = library_rows(chain_bounds(parsed.chain))
    assert_rows(got, prop44_layers(spec), context=json.dumps(spec))
    b = chain_bounds(parsed.chain)
    assert (b.output_bound, b.lipschitz, b.smoothness) == got[-1]
    assert [r.index for r in b.layers] == list(range(1, len(spec["layers"]) + 1))


@settings(deadline=None, max_examples=60)
@given(spec_st(), radius_st, input_norm_st)
def test_prop44_with_options_matches_reference(spec, radius, input_norm):
    """Chain.with_options (the command-line overrides) = the reference with overridden R, ||x||."""
    chain = parse_spec(spec).chain.with_options(radius=num(radius), input_norm=num(input_norm))
    expected = prop44_layers(spec, radius=num(radius), input_norm=num(input_norm))
    assert_rows(library_rows(chain_bounds(chain)), expected, context=json.dumps([spec, radius, input_norm]))


# --------------------------------------------------------------------------- 2. Cor. 4.5
@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(spec_st(weight_norms=True))
def test_cor45_around_weights_matches_reference(spec):
    chain = parse_spec(copy.deepcopy(spec)).chain.around_weights()
    assert chain.centre == "weights"
    got = library_rows(chain_bounds(chain))
    assert_rows(got, prop44_layers(spec, around_weights=True), context=json.dumps(spec))


def test_cor45_hand_example():
    """One FC layer, ||v*|| = 2, R = 1, x = 3: l_z' = 0 + 1*2, ||beta0'|| = 0 + 1*2."""
    spec = {"input_norm": 3.0, "radius": 1.0,
            "layers": [{"bilinear": {"smoothness": 1, "weight_lipschitz": 1, "input_lipschitz": 0, "offset_norm": 0},
                        "weight_norm": 2.0}],
            "loss": {"lipschitz": 1, "smoothness": 1}}
    chain = parse_spec(spec).chain.around_weights()
    b = chain.layers[0].bilinear
    assert (b.smoothness, b.weight_lipschitz, b.input_lipschitz, b.offset_norm) == (1.0, 1.0, 2.0, 2.0)
    row = chain_bounds(chain).layers[0]
    # m = 1*1*3 + 1*1 + 2*3 + 2 = 12 (||(v*+D) x + bias|| <= (2+1)*3 + 2 + 1); l = 1*3 + 1 = 4; L = 0
    assert (row.output_bound, row.lipschitz, row.smoothness) == (12.0, 4.0, 0.0)


def test_cor45_needs_weight_norms_and_is_not_applied_twice():
    spec = {"layers": [{"bilinear": {k: 1.0 for k in BILINEAR_KEYS}, "weight_norm": 1.0},
                       {"bilinear": {k: 1.0 for k in BILINEAR_KEYS}}],
            "loss": {"lipschitz": 1, "smoothness": 1}}
    with pytest.raises(ChainError, match="layer 2"):
        parse_spec(spec).chain.around_weights()
    spec["layers"][1]["weight_norm"] = 0.5
    centred = parse_spec(spec).chain.around_weights()
    with pytest.raises(ChainError):
        centred.around_weights()


def test_cor45_zero_weight_norm_is_prop44():
    spec = {"input_norm": 2.0, "radius": 0.5,
            "layers": [{"bilinear": {"smoothness": "inf", "weight_lipschitz": "inf", "input_lipschitz": 1.0,
                                     "offset_norm": 0.0}, "weight_norm": 0.0}],
            "loss": {"lipschitz": 1, "smoothness": 1}}
    chain = parse_spec(spec).chain
    assert chain_bounds(chain.around_weights()).layers == chain_bounds(chain).layers


# --------------------------------------------------------------------------- 3. CLI
def _cli_main():
    from smoothchain.cli import main

    return main


def _json_num(x):
    return num(x)


def _strict_json(text):
    """One JSON document, rejecting the non-standard NaN/Infinity tokens (DESIGN.md: "inf" strings)."""
    def bad(token):
        raise AssertionError(f"non-standard JSON token {token} in CLI output")
    return json.loads(text, parse_constant=bad)


def _check_cli_document(doc, spec, *, radius=None, input_norm=None, around_weights=False, l2=None):
    expected = prop44_layers(spec, radius=radius, input_norm=input_norm, around_weights=around_weights)
    assert len(doc["layers"]) == len(expected)
    for i, (entry, (m, l, L)) in enumerate(zip(doc["layers"], expected), start=1):
        assert entry["index"] == i
        assert isinstance(entry["name"], str)
        for key, ref in (("output_bound", m), ("lipschitz", l), ("smoothness", L)):
            value = entry[key]
            assert not (isinstance(value, float) and math.isinf(value)), "infinite values must be the string \"inf\""
            assert same(_json_num(value), ref), (i, key, value, ref)
    m, l, L = expected[-1]
    chain = doc["chain"]
    assert same(num(chain["output_bound"]), m) and same(num(chain["lipschitz"]), l) and same(num(chain["smoothness"]), L)

    obj = doc["objective"]
    lf, Lf = num(spec["loss"]["lipschitz"]), num(spec["loss"]["smoothness"])
    assert same(num(obj["loss_lipschitz"]), lf)
    assert same(num(obj["loss_smoothness"]), Lf)
    LF = prop42(l, L, lf, Lf, num(spec.get("regularization_smoothness", 0.0)) if l2 is None else l2)
    assert same(num(obj["smoothness"]), LF), (obj, LF)
    step = num(obj["step_size"])
    if math.isinf(LF):
        assert step == 0.0
    elif LF > 0:
        assert same(step, 1.0 / LF)
    assert num(obj["iterations"]) >= 0
    return LF


@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=spec_st(max_depth=4))
def test_cli_certify_spec_json(spec, tmp_path, capsys):
    main = _cli_main()
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    capsys.readouterr()
    rc = main(["certify", "--spec", str(path), "--json"])
    out = capsys.readouterr().out
    assert rc in (0, None)
    doc = _strict_json(out)  # exactly one JSON document on stdout
    _check_cli_document(doc, spec)


def test_cli_certify_spec_overrides_radius_and_input_norm(tmp_path, capsys):
    main = _cli_main()
    spec = {"input_norm": 1.0, "radius": 1.0,
            "layers": [{"bilinear": {"smoothness": 1.0, "weight_lipschitz": 1.0, "input_lipschitz": 0.5, "offset_norm": 0.1},
                        "nonlinear": [{"bound": 2.0, "lipschitz": 0.25, "smoothness": 0.1, "value_at_zero": 1.0,
                                       "jacobian_at_zero": 0.25}]},
                       {"bilinear": {"smoothness": 2.0, "weight_lipschitz": 0.0, "input_lipschitz": 0.0, "offset_norm": 0.0},
                        "nonlinear": [{"bound": "inf", "lipschitz": 1.0, "smoothness": 0.25, "value_at_zero": 0.69,
                                       "jacobian_at_zero": 0.5}]}],
            "loss": {"lipschitz": 2.0, "smoothness": 2.0}, "regularization_smoothness": 0.0}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    capsys.readouterr()
    rc = main(["certify", "--spec", str(path), "--json", "--radius", "3.5", "--input-norm", "0.25"])
    assert rc in (0, None)
    _check_cli_document(_strict_json(capsys.readouterr().out), spec, radius=3.5, input_norm=0.25)


@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=spec_st(weight_norms=True, max_depth=4))
def test_cli_certify_spec_around_weights_json(spec, tmp_path, capsys):
    """``--around-weights`` on a spec with (finite) weight norms = RH Cor. 4.5 in the reference."""
    main = _cli_main()
    for layer in spec["layers"]:  # infinite weight norms: see test_cli_certify_infinite_weight_norm
        if num(layer["weight_norm"]) == INF:
            layer["weight_norm"] = 1e3
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    capsys.readouterr()
    rc = main(["certify", "--spec", str(path), "--json", "--around-weights"])
    assert rc in (0, None)
    _check_cli_document(_strict_json(capsys.readouterr().out), spec, around_weights=True)


def test_cli_certify_spec_l2_gap_epsilon(tmp_path, capsys):
    """--l2 overrides the spec's regularization; iterations = ceil(2 L_F Delta / eps^2) with --gap."""
    main = _cli_main()
    spec = {"input_norm": 1.0, "radius": 1.0,
            "layers": [{"bilinear": {"smoothness": 1.0, "weight_lipschitz": 0.0, "input_lipschitz": 0.0,
                                     "offset_norm": 0.0},
                        "nonlinear": [{"bound": "inf", "lipschitz": "inf", "smoothness": 1.0, "value_at_zero": 0.0,
                                       "jacobian_at_zero": 1.0}]}],
            "loss": {"lipschitz": 2.0, "smoothness": 0.5}, "regularization_smoothness": 7.0}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    capsys.readouterr()
    rc = main(["certify", "--spec", str(path), "--json", "--l2", "0.25", "--gap", "1.25", "--epsilon", "0.5"])
    assert rc in (0, None)
    doc = _strict_json(capsys.readouterr().out)
    # same chain as test_objective_hand_example: l = 2, L = 1; L_F = 1*2 + 4*0.5 + 0.25 = 4.25
    assert _check_cli_document(doc, spec, l2=0.25) == 4.25
    assert num(doc["objective"]["smoothness"]) == 4.25
    assert num(doc["objective"]["iterations"]) == 43.0  # ceil(2 * 4.25 * 1.25 / 0.25) = ceil(42.5)


@pytest.mark.parametrize("l2", ["0", "1"])
@pytest.mark.parametrize("loss_lipschitz", [0.0, 2.0])
def test_cli_certify_infinite_weight_norm(tmp_path, capsys, l2, loss_lipschitz):
    """``"weight_norm": "inf"`` is accepted by the spec format; --around-weights must then give a
    valid certificate (strict JSON, no NaN) or a one-line error -- never a traceback."""
    main = _cli_main()
    spec = {"input_norm": 1.0, "radius": 1.0,
            "layers": [{"bilinear": {"smoothness": 0.0, "weight_lipschitz": 0.0, "input_lipschitz": 1.0,
                                     "offset_norm": 1.0}, "weight_norm": "inf"}],
            "loss": {"lipschitz": loss_lipschitz, "smoothness": 1.0}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    capsys.readouterr()
    try:
        rc = main(["certify", "--spec", str(path), "--json", "--around-weights", "--l2", l2])
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    if rc in (0, None):
        doc = _strict_json(captured.out)
        _check_cli_document(doc, spec, around_weights=True, l2=float(l2))
        assert not math.isnan(num(doc["objective"]["iterations"]))
    else:
        assert len(captured.err.strip().splitlines()) == 1, captured.err


def test_cli_certify_bad_spec_fails_with_one_line(tmp_path, capsys):
    main = _cli_main()
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"layers": [{"bilinear": {"smoothness": -1}}], "loss": {}}))
    capsys.readouterr()
    try:
        rc = main(["certify", "--spec", str(path), "--json"])
    except SystemExit as exc:  # argparse-style exit is acceptable too
        rc = exc.code
    captured = capsys.readouterr()
    assert rc not in (0, None)
    err, out = captured.err.strip(), captured.out.strip()
    if err:  # the usual case: a one-line message on stderr, nothing (or a JSON error document) on stdout
        assert len(err.splitlines()) == 1, err
        assert out == "" or isinstance(json.loads(out), dict)
    else:  # or a one-line JSON error document on stdout
        assert len(out.splitlines()) == 1 and isinstance(json.loads(out), dict), out


# --------------------------------------------------------------------------- 4. hand examples
def comp(bound, lip, smooth, a0, g0, name=""):
    return ComponentConstants(bound=bound, lipschitz=lip, smoothness=smooth, value_at_zero=a0,
                              jacobian_at_zero=g0, name=name)


def comp_dict(c: ComponentConstants) -> dict:
    return {k: getattr(c, k) for k in NONLINEAR_KEYS}


# Batch of eta = 4 entries: sigmoid (sqrt(eta), 1/4, 1/10, sqrt(eta)/2, 1/4), tanh (sqrt(eta), 1, 4/(3 sqrt3), 0, 1).
SIGMOID4 = comp(2.0, 0.25, 0.1, 1.0, 0.25, "sigmoid")
TANH4 = comp(2.0, 1.0, 4 / (3 * math.sqrt(3)), 0.0, 1.0, "tanh")
RELU = comp(INF, 1.0, INF, 0.0, 1.0, "relu")


def test_lemma_d2_single_sigmoid():
    # R = 3: m~ = min{2, 1 + 0.25*3, 1 + (0.25 + 0.1*3)*3} = min{2, 1.75, 2.65} = 1.75
    #        l~ = min{0.25, 0.25 + 0.1*3} = 0.25;  L = 0.1 (one component, empty products)
    cb = composite_bounds([SIGMOID4], 3.0)
    assert cb.bounds == (3.0, pytest.approx(1.75, rel=1e-15))
    assert cb.lipschitz == (0.25,)
    assert cb.bound == pytest.approx(1.75, rel=1e-15)
    assert cb.lipschitz_product == 0.25
    assert cb.smoothness == pytest.approx(0.1, rel=1e-15)
    # R = 0.5: m~ = min{2, 1.125, 1 + 0.3*0.5 = 1.15} = 1.125; l~ = min{0.25, 0.3} = 0.25
    assert composite_bounds([SIGMOID4], 0.5).bound == pytest.approx(1.125, rel=1e-15)


def test_lemma_d2_sigmoid_then_tanh():
    # j=1 (sigmoid, R=3): m~1 = 1.75, l~1 = 0.25
    # j=2 (tanh): m~2 = min{2, 0 + 1*1.75, (1 + 0.7698*1.75)*1.75} = 1.75, l~2 = min{1, 1 + 0.7698*1.75} = 1
    # L = L_1 * l~2 + L_2 * l~1^2 = 0.1 * 1 + 4/(3 sqrt 3) / 16
    cb = composite_bounds([SIGMOID4, TANH4], 3.0)
    assert cb.bound == pytest.approx(1.75, rel=1e-14)
    assert cb.lipschitz == (0.25, 1.0)
    assert cb.lipschitz_product == 0.25
    assert cb.smoothness == pytest.approx(0.1 + 4 / (3 * math.sqrt(3)) / 16, rel=1e-14)


def test_lemma_d2_quadratic_bound_wins():
    # a1 = (inf, inf, 2, 0.5, 1) on R = 0.5: m~1 = min{inf, 0.5 + inf*0.5, 0.5 + (1 + 2*0.5)*0.5} = 1.5,
    #   l~1 = min{inf, 1 + 2*0.5} = 2
    # a2 = (inf, 3, 0, 0, 3): m~2 = min{inf, 3*1.5, (3 + 0*1.5)*1.5} = 4.5, l~2 = min{3, 3 + 0} = 3
    # L = 2 * 3 + 0 * 2^2 = 6
    a1 = comp(INF, INF, 2.0, 0.5, 1.0)
    a2 = comp(INF, 3.0, 0.0, 0.0, 3.0)
    cb = composite_bounds([a1, a2], 0.5)
    assert cb.bounds == (0.5, 1.5, 4.5)
    assert cb.lipschitz == (2.0, 3.0)
    assert cb.lipschitz_product == 6.0
    assert cb.smoothness == 6.0


def test_lemma_d2_three_components_formula():
    # L = L1 * l2 l3 + L2 * l1^2 * l3 + L3 * (l1 l2)^2 with every l~ = l_a (small L_a m so l_a wins).
    a = [comp(INF, 2.0, 0.5, 0.0, 2.0), comp(INF, 3.0, 0.25, 0.0, 3.0), comp(INF, 0.5, 4.0, 0.0, 0.5)]
    cb = composite_bounds(a, 1.0)
    assert cb.lipschitz == (2.0, 3.0, 0.5)
    assert cb.smoothness == pytest.approx(0.5 * 3 * 0.5 + 0.25 * 4 * 0.5 + 4.0 * 36, rel=1e-15)
    m, ls, L = lemma_d2([comp_dict(c) for c in a], 1.0)
    assert (m, tuple(ls)) == (cb.bound, cb.lipschitz) and L == pytest.approx(cb.smoothness, rel=1e-15)


def test_lemma_d2_empty_is_identity():
    cb = composite_bounds([], 7.0)
    assert (cb.bound, cb.lipschitz_product, cb.smoothness) == (7.0, 1.0, 0.0)


def test_lemma_d2_relu_zero_radius_no_nan():
    # ReLU: L = inf, but on B_0 the term L m~0 = inf * 0 = 0: m~ = 0, l~ = min{1, 1 + 0} = 1; L = inf (declared).
    cb = composite_bounds([RELU], 0.0)
    assert (cb.bound, cb.lipschitz_product) == (0.0, 1.0)
    assert cb.smoothness == INF
    assert not any(math.isnan(x) for x in (*cb.bounds, *cb.lipschitz, cb.smoothness))


@settings(deadline=None, max_examples=150)
@given(jittered(st.lists(component_st, min_size=0, max_size=4)), st.sampled_from(FINITE_POOL))
def test_lemma_d2_matches_reference(components, radius):
    cs = [comp(*(num(c[k]) for k in NONLINEAR_KEYS)) for c in components]
    cb = composite_bounds(cs, radius)
    m, ls, L = lemma_d2(components, radius)
    assert same(cb.bound, m)
    assert len(cb.lipschitz) == len(ls) and all(same(x, y) for x, y in zip(cb.lipschitz, ls))
    assert same(cb.smoothness, L)
    assert same(cb.lipschitz_product, times(*ls) if ls else 1.0)


def fc(smooth, wl, il, off):
    return BilinearConstants(smoothness=smooth, weight_lipschitz=wl, input_lipschitz=il, offset_norm=off)


def test_prop44_single_linear_layer():
    # FC with bias, R = 2, ||x|| = 3: m = 1*2*3 + 1*2 = 8; l = (2*0 + 3*1 + 1) = 4; L = 0 (linear in v for fixed x)
    chain = Chain((Layer(fc(1, 1, 0, 0)),), input_norm=3.0, radius=2.0)
    row = chain_bounds(chain).layers[0]
    assert (row.pre_activation_bound, row.output_bound, row.lipschitz, row.smoothness) == (8.0, 8.0, 4.0, 0.0)


def test_prop44_two_layers_by_hand():
    # Layer 1: FC (1, 1, 0, 0) + sigmoid(eta=4); R = 1, ||x|| = 2.
    #   m_{1,0} = 1*1*2 + 1*1 = 3; sigmoid on B_3: m_1 = 1.75, l_{1,1} = 0.25, L_{1,1} = 0.1
    #   l_1 = 0.25 * ((1+0)*0 + 2*1 + 1) = 0.75
    #   L_1 = (L_beta m_0 + l_v)^2 L_{1,1} = 9 * 0.1 = 0.9
    # Layer 2: FC (2, 0, 0.5, 0) + tanh(eta=4); A = L_beta R + l_z = 2.5, B = L_beta m_1 + l_v = 3.5
    #   m_{2,0} = 2*1*1.75 + 0.5*1.75 = 4.375; tanh: l~ = min{1, 1 + c*4.375} = 1, m_2 = min{2, 4.375, ..} = 2
    #   l_2 = 1 * (2.5*0.75 + 3.5) = 5.375
    #   L_2 = L_1*A*1 + A^2 c l_1^2 + 2 (B A c + 2*1) l_1 + B^2 c,   c = 4/(3 sqrt 3)
    c = 4 / (3 * math.sqrt(3))
    chain = Chain((Layer(fc(1, 1, 0, 0), (SIGMOID4,)), Layer(fc(2, 0, 0.5, 0), (TANH4,))), input_norm=2.0, radius=1.0)
    r1, r2 = chain_bounds(chain).layers
    assert r1.pre_activation_bound == 3.0
    assert r1.output_bound == pytest.approx(1.75, rel=1e-15)
    assert r1.lipschitz == pytest.approx(0.75, rel=1e-15)
    assert r1.smoothness == pytest.approx(0.9, rel=1e-15)
    assert r2.pre_activation_bound == pytest.approx(4.375, rel=1e-15)
    assert r2.output_bound == 2.0
    assert r2.lipschitz == pytest.approx(5.375, rel=1e-15)
    L2 = 0.9 * 2.5 + 2.5**2 * c * 0.75**2 + 2 * (3.5 * 2.5 * c + 2.0) * 0.75 + 3.5**2 * c
    assert r2.smoothness == pytest.approx(L2, rel=1e-14)


def test_generic_chain_bounds_hand_unrolled():
    # (l_phi, L_phi) = (2, 3), (0.5, 1), (4, 0.25)
    # l_1 = 2,                L_1 = 3
    # l_2 = 0.5 + 2*0.5 = 1.5, L_2 = 3*0.5 + 1*(1+2)^2 = 10.5
    # l_3 = 4 + 1.5*4 = 10,    L_3 = 10.5*4 + 0.25*(1+1.5)^2 = 43.5625
    assert generic_chain_bounds([2.0], [3.0]) == (2.0, 3.0)
    assert generic_chain_bounds([2.0, 0.5], [3.0, 1.0]) == (1.5, 10.5)
    assert generic_chain_bounds([2.0, 0.5, 4.0], [3.0, 1.0, 0.25]) == (10.0, 43.5625)
    assert generic_chain_bounds([], []) == (0.0, 0.0)
    with pytest.raises(ValueError):
        generic_chain_bounds([1.0, 2.0], [1.0])


def test_generic_chain_bounds_zero_times_inf():
    # First layer: L_0 = 0 so L_0 * l_phi = 0 even for l_phi = inf; l_1 = inf + 0 * inf = inf.
    assert generic_chain_bounds([INF], [1.0]) == (INF, 1.0)
    # A constant layer (l_phi = 0, L_phi = 0) after an infinite one kills everything.
    assert generic_chain_bounds([INF, 0.0], [INF, 0.0]) == (0.0, 0.0)


@settings(deadline=None, max_examples=100)
@given(jittered(st.lists(st.lists(constant, min_size=2, max_size=2), min_size=0, max_size=6)))
def test_generic_chain_bounds_matches_reference(pairs):
    ls = [num(a) for a, _ in pairs]
    Ls = [num(b) for _, b in pairs]
    got = generic_chain_bounds(ls, Ls)
    ref = prop43(ls, Ls)
    assert same(got[0], ref[0]) and same(got[1], ref[1]), (pairs, got, ref)


def test_relu_first_layer_zero_input_no_nan():
    # ||x|| = 0, FC without bias + ReLU (L = inf): m_{1,0} = 0, l_{1,1} = min{1, 1 + inf*0} = 1,
    # l_1 = 1 * (R*0 + 0*1 + 0) = 0, L_1 = every term has a zero factor = 0.
    chain = Chain((Layer(fc(1, 0, 0, 0), (RELU,)),), input_norm=0.0, radius=5.0)
    row = chain_bounds(chain).layers[0]
    assert (row.output_bound, row.lipschitz, row.smoothness) == (0.0, 0.0, 0.0)


def test_relu_first_layer_inf_then_constant_layer():
    # Layer 1: FC with bias + ReLU, ||x|| = 2, R = 1: m = 3, l_1 = 1*(0 + 2 + 1) = 3,
    #   L_1 = (L_beta m_0 + l_v)^2 * inf = inf; the l_0 = 0 terms vanish without nan.
    # Layer 2: all-zero bilinear constants: m_2 = 0, l_2 = 0, L_2 = inf * 0 + ... = 0.
    relu_layer = Layer(fc(1, 1, 0, 0), (RELU,))
    zero_layer = Layer(fc(0, 0, 0, 0), (SIGMOID4,))
    r1, r2 = chain_bounds(Chain((relu_layer, zero_layer), input_norm=2.0, radius=1.0)).layers
    assert (r1.output_bound, r1.lipschitz, r1.smoothness) == (3.0, 3.0, INF)
    # sigmoid on B_0: m~ = min{2, 1 + 0, 1 + 0} = 1 (= ||a(0)||)
    assert (r2.pre_activation_bound, r2.output_bound, r2.lipschitz, r2.smoothness) == (0.0, 1.0, 0.0, 0.0)
    # With an offset only (constant layer), still l = L = 0.
    const_layer = Layer(fc(0, 0, 0, 5.0), ())
    r = chain_bounds(Chain((relu_layer, const_layer), input_norm=2.0, radius=1.0)).layers[1]
    assert (r.output_bound, r.lipschitz, r.smoothness) == (5.0, 0.0, 0.0)


def test_inf_propagates_without_zero_factor():
    # An infinite weight Lipschitz constant with R > 0 gives inf everywhere it enters.
    chain = Chain((Layer(fc(0, INF, 0, 0), (SIGMOID4,)), Layer(fc(0, 0, 1, 0), ())), input_norm=1.0, radius=1.0)
    r1, r2 = chain_bounds(chain).layers
    assert r1.output_bound == 2.0  # bounded sigmoid caps it
    assert r1.lipschitz == INF and r1.smoothness == INF
    assert r2.lipschitz == INF and r2.smoothness == INF
    # ... but with R = 0 the bound no longer sees it (0 * inf = 0), though l, L still do.
    r1 = chain_bounds(Chain((Layer(fc(0, INF, 0, 0), ()),), input_norm=1.0, radius=0.0)).layers[0]
    assert (r1.output_bound, r1.lipschitz, r1.smoothness) == (0.0, INF, 0.0)


# --------------------------------------------------------------------------- 5. Prop. 4.2, Thm 4.1
def _chain_with(lip_target: float):
    """A one-layer linear chain with l = lip_target and L = 0 (FC without bias, R=1, ||x|| = lip)."""
    return Chain((Layer(fc(1, 0, 0, 0)),), input_norm=lip_target, radius=1.0)


def test_objective_hand_example():
    # Two-layer chain of test_prop44_two_layers_by_hand has l, L known; use a simpler exact one:
    # FC (1,0,0,0) + quadratic-ish component with l~ = 2 and L = 1: R = 1, ||x|| = 1.
    a = comp(INF, INF, 1.0, 0.0, 1.0)  # on B_1: l~ = 1 + 1*1 = 2, m~ = (1 + 1)*1 = 2
    bounds = chain_bounds(Chain((Layer(fc(1, 0, 0, 0), (a,)),), input_norm=1.0, radius=1.0))
    # l_1 = 2 * (0 + 1*1 + 0) = 2;  L_1 = (1*1 + 0)^2 * 1 = 1
    assert (bounds.output_bound, bounds.lipschitz, bounds.smoothness) == (2.0, 2.0, 1.0)
    # L_F = L_psi l_f + l_psi^2 L_f + lambda = 1*2 + 4*0.5 + 0.25 = 4.25
    ob = objective_bounds(bounds, LossConstants(2.0, 0.5), l2=0.25, epsilon=0.5, gap=1.25)
    assert ob.smoothness == 4.25
    assert ob.step_size == 1 / 4.25
    # iterations = ceil(2 * 4.25 * 1.25 / 0.25) = ceil(42.5) = 43
    assert ob.iterations == 43.0
    assert (ob.loss_lipschitz, ob.loss_smoothness, ob.regularization_smoothness, ob.gap) == (2.0, 0.5, 0.25, 1.25)
    # integer case is not rounded up: 2 * 4.25 * 1.5 / 0.25 = 51
    assert objective_bounds(bounds, LossConstants(2.0, 0.5), l2=0.25, epsilon=0.5, gap=1.5).iterations == 51.0
    # default gap (documented): Delta = 2 l_f m_psi + lambda/2 tau R^2 = 2*2*2 + 0.125 = 8.125
    ob = objective_bounds(bounds, LossConstants(2.0, 0.5), l2=0.25, epsilon=0.5)
    assert ob.gap == 8.125
    assert ob.iterations == math.ceil(2 * 4.25 * 8.125 / 0.25)


@settings(deadline=None, max_examples=100)
@given(spec_st(max_depth=4), constant, constant, finite_constant,
       st.sampled_from([1e-3, 0.01, 0.1, 0.3, 1.0, 7.5]), finite_constant)
def test_objective_matches_prop42_thm41(spec, lf, Lf, lam, eps, gap):
    bounds = chain_bounds(parse_spec(spec).chain)
    lf, Lf = num(lf), num(Lf)
    ob = objective_bounds(bounds, LossConstants(lf, Lf), l2=lam, epsilon=eps, gap=gap)
    LF = prop42(bounds.lipschitz, bounds.smoothness, lf, Lf, lam)
    assert same(ob.smoothness, LF)
    if math.isinf(LF):
        assert ob.step_size == 0.0
    elif LF == 0:
        assert ob.step_size == INF
    else:
        assert same(ob.step_size, 1.0 / LF)
    raw = times(2.0, LF, gap) / eps**2
    if math.isinf(raw):
        assert ob.iterations == INF
    else:
        assert ob.iterations == math.ceil(raw) or abs(ob.iterations - raw) <= 1 + 1e-9 * raw
        assert ob.iterations == int(ob.iterations) and ob.iterations >= raw * (1 - 1e-12)


def test_objective_inf_propagation():
    inf_chain = chain_bounds(Chain((Layer(fc(1, 1, 0, 0), (RELU,)),), input_norm=2.0, radius=1.0))
    assert inf_chain.smoothness == INF and inf_chain.lipschitz == 3.0
    ob = objective_bounds(inf_chain, LossConstants(2.0, 2.0), gap=1.0)
    assert ob.smoothness == INF and ob.step_size == 0.0 and ob.iterations == INF
    # l_f = 0 removes the L_psi term (0 * inf = 0): L_F = 9 * 2 = 18
    ob = objective_bounds(inf_chain, LossConstants(0.0, 2.0), gap=1.0, epsilon=1.0)
    assert ob.smoothness == 18.0 and ob.step_size == 1 / 18 and ob.iterations == 36.0
    # L_F = inf but Delta = 0: no iterations needed
    assert objective_bounds(inf_chain, LossConstants(2.0, 2.0), gap=0.0).iterations == 0.0
    # L_F = 0 (constant objective): infinite step, no iterations
    zero = chain_bounds(_chain_with(0.0))
    ob = objective_bounds(zero, LossConstants(1.0, 1.0), gap=1.0)
    assert ob.smoothness == 0.0 and ob.step_size == INF and ob.iterations == 0.0


def test_objective_default_gap_around_weights():
    # Documented default: Delta = 2 l_f m_psi + lambda/2 sum_l ((w_l + R)^2 - max(0, w_l - R)^2).
    bounds = chain_bounds(Chain((Layer(fc(1, 0, 0, 0), (), weight_norm=3.0),
                                 Layer(fc(1, 0, 0, 0), (), weight_norm=0.5)), input_norm=2.0, radius=1.0).around_weights())
    ob = objective_bounds(bounds, LossConstants(1.0, 1.0), l2=2.0, weight_norms=(3.0, 0.5))
    # ranges: (4^2 - 2^2) = 12 and (1.5^2 - 0) = 2.25 -> lambda/2 * 14.25 = 14.25
    assert ob.gap == pytest.approx(2 * 1.0 * bounds.output_bound + 14.25, rel=1e-12)


def test_objective_default_gap_infinite_weight_norm_no_nan():
    """``"weight_norm": "inf"`` is a valid spec value; the default gap must not become NaN.

    With lambda = 0 the regularisation contributes nothing (0 * inf = 0), so Delta = 2 l_f m_psi;
    with lambda > 0 and R > 0 the range of r on C is infinite.
    """
    # A constant layer (only beta^0): Cor. 4.5 shifts add 0 * inf = 0, so m = 1, l = L = 0.
    # (Rejecting an infinite weight norm up front with a ChainError would be acceptable too.)
    try:
        chain = Chain((Layer(fc(0, 0, 0, 1.0), (), weight_norm=INF),), input_norm=1.0, radius=1.0).around_weights()
    except ChainError:
        return
    bounds = chain_bounds(chain)
    assert (bounds.output_bound, bounds.lipschitz, bounds.smoothness) == (1.0, 0.0, 0.0)
    ob = objective_bounds(bounds, LossConstants(2.0, 1.0), l2=0.0, epsilon=1.0, weight_norms=(INF,))
    assert ob.gap == 4.0 and ob.smoothness == 0.0 and ob.iterations == 0.0  # Delta = 2 * 2 * 1
    ob = objective_bounds(bounds, LossConstants(2.0, 1.0), l2=1.0, epsilon=1.0, weight_norms=(INF,))
    assert ob.smoothness == 1.0 and ob.gap == INF and ob.iterations == INF


def test_objective_default_gap_no_cancellation():
    """(w + R)^2 - (w - R)^2 = 4 w R exactly; computed naively it cancels to 0 for w >> R, and the
    default Delta (hence the iteration bound) would be under-estimated."""
    bounds = chain_bounds(Chain((Layer(fc(0, 0, 0, 1.0), (), weight_norm=1e8),), input_norm=1.0,
                                radius=1e-9).around_weights())
    ob = objective_bounds(bounds, LossConstants(0.0, 1.0), l2=1.0, weight_norms=(1e8,))
    # l_f = 0: Delta = lambda/2 * 4 w R = 0.2 (1e8 + 1e-9 == 1e8 in floating point)
    assert ob.gap == pytest.approx(0.2, rel=1e-9)


@pytest.mark.parametrize("kwargs", [{"l2": -1.0}, {"l2": math.nan}, {"epsilon": 0.0}, {"epsilon": -1.0},
                                    {"gap": -1.0}, {"gap": math.nan}])
def test_objective_rejects_bad_options(kwargs):
    with pytest.raises(ChainError):
        objective_bounds(chain_bounds(_chain_with(1.0)), LossConstants(1.0, 1.0), **kwargs)


# --------------------------------------------------------------------------- 6. spec format
@settings(deadline=None, max_examples=60)
@given(spec_st(weight_norms=False), st.booleans())
def test_spec_round_trip(spec, with_weights):
    if with_weights:
        for i, layer in enumerate(spec["layers"]):
            layer["weight_norm"] = [0.0, 1.5, "inf"][i % 3]
    parsed = parse_spec(spec)
    doc = spec_to_dict(parsed.chain, parsed.loss, parsed.regularization_smoothness)
    text = json.dumps(doc, allow_nan=False)  # "inf" strings, never Infinity tokens
    again = parse_spec(json.loads(text))
    assert again.chain == parsed.chain
    assert again.loss == parsed.loss
    assert again.regularization_smoothness == parsed.regularization_smoothness
    # and it is the same certificate input as the original document
    assert_rows(library_rows(chain_bounds(again.chain)), prop44_layers(spec))


def test_load_spec_file(tmp_path):
    spec = {"input_norm": 2.0, "radius": 0.5,
            "layers": [{"name": "l1", "bilinear": {"smoothness": 1, "weight_lipschitz": "Infinity",
                                                   "input_lipschitz": 0, "offset_norm": 0},
                        "nonlinear": [{"bound": "INF", "lipschitz": 1, "smoothness": "+inf", "value_at_zero": 0,
                                       "jacobian_at_zero": 1}]}],
            "loss": {"lipschitz": 2.0, "smoothness": 2.0}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    loaded = load_spec(path)
    assert loaded == parse_spec(spec)
    assert loaded.chain.layers[0].bilinear.weight_lipschitz == INF
    assert loaded.chain.layers[0].nonlinear[0].bound == INF
    assert loaded.chain.layers[0].nonlinear[0].smoothness == INF
    assert loaded.chain.layers[0].name == "l1"
    with pytest.raises(ChainError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{not json")
        load_spec(tmp_path / "bad.json")
    with pytest.raises(ChainError, match="not found"):
        load_spec(tmp_path / "missing.json")


def _good_spec():
    bil = {"smoothness": 1.0, "weight_lipschitz": 1.0, "input_lipschitz": 0.0, "offset_norm": 0.0}
    nl = {"bound": "inf", "lipschitz": 1.0, "smoothness": 0.25, "value_at_zero": 0.69, "jacobian_at_zero": 0.5}
    return {"input_norm": 1.0, "radius": 1.0,
            "layers": [{"name": "a", "bilinear": dict(bil), "nonlinear": [dict(nl), dict(nl)]},
                       {"bilinear": dict(bil), "nonlinear": [dict(nl)]},
                       {"bilinear": dict(bil)}],
            "loss": {"lipschitz": 2.0, "smoothness": 2.0}, "regularization_smoothness": 0.0}


def _mutate(path, value=None, delete=False):
    spec = _good_spec()
    node = spec
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return spec


MALFORMED = [
    ("missing-bilinear-key", _mutate(["layers", 1, "bilinear", "smoothness"], delete=True),
     ["layers[2].bilinear", "smoothness"]),
    ("missing-nonlinear-key", _mutate(["layers", 0, "nonlinear", 1, "jacobian_at_zero"], delete=True),
     ["layers[1].nonlinear[2]", "jacobian_at_zero"]),
    ("missing-bilinear", _mutate(["layers", 2, "bilinear"], delete=True), ["layers[3]", "bilinear"]),
    ("missing-loss-key", _mutate(["loss", "smoothness"], delete=True), ["loss", "smoothness"]),
    ("negative", _mutate(["layers", 1, "bilinear", "smoothness"], -1.0), ["layers[2].bilinear.smoothness"]),
    ("negative-nonlinear", _mutate(["layers", 0, "nonlinear", 1, "lipschitz"], -0.5),
     ["layers[1].nonlinear[2].lipschitz"]),
    ("nan", _mutate(["layers", 1, "bilinear", "smoothness"], math.nan), ["layers[2].bilinear.smoothness"]),
    ("nan-string", _mutate(["layers", 1, "bilinear", "offset_norm"], "nan"), ["layers[2].bilinear.offset_norm"]),
    ("minus-inf-string", _mutate(["layers", 0, "nonlinear", 0, "bound"], "-inf"), ["layers[1].nonlinear[1].bound"]),
    ("minus-inf", _mutate(["layers", 0, "bilinear", "input_lipschitz"], -math.inf),
     ["layers[1].bilinear.input_lipschitz"]),
    ("abc", _mutate(["layers", 1, "nonlinear", 0, "value_at_zero"], "abc"), ["layers[2].nonlinear[1].value_at_zero"]),
    ("bool", _mutate(["layers", 0, "bilinear", "weight_lipschitz"], True), ["layers[1].bilinear.weight_lipschitz"]),
    ("null", _mutate(["layers", 0, "bilinear", "weight_lipschitz"], None), ["layers[1].bilinear.weight_lipschitz"]),
    ("list-constant", _mutate(["loss", "lipschitz"], [1.0]), ["loss.lipschitz"]),
    ("unknown-top", _mutate(["radiuss"], 1.0), ["radiuss"]),
    ("unknown-layer", _mutate(["layers", 2, "activation"], "relu"), ["layers[3]", "activation"]),
    ("unknown-bilinear", _mutate(["layers", 1, "bilinear", "bias"], 1.0), ["layers[2].bilinear", "bias"]),
    ("unknown-nonlinear", _mutate(["layers", 0, "nonlinear", 1, "foo"], 1.0), ["layers[1].nonlinear[2]", "foo"]),
    ("layers-dict", _mutate(["layers"], {"bilinear": {}}), ["layers"]),
    ("layers-string", _mutate(["layers"], "abc"), ["layers"]),
    ("layers-empty", _mutate(["layers"], []), ["layers"]),
    ("layers-missing", _mutate(["layers"], delete=True), ["layers"]),
    ("layer-not-object", _mutate(["layers", 1], [1, 2]), ["layers[2]"]),
    ("bilinear-not-object", _mutate(["layers", 1, "bilinear"], 3.0), ["layers[2].bilinear"]),
    ("nonlinear-not-list", _mutate(["layers", 1, "nonlinear"], {"bound": 1.0}), ["layers[2].nonlinear"]),
    ("component-not-object", _mutate(["layers", 1, "nonlinear", 0], "relu"), ["layers[2].nonlinear[1]"]),
    ("weight-norm-negative", _mutate(["layers", 2, "weight_norm"], -2.0), ["layers[3].weight_norm"]),
    ("radius-negative", _mutate(["radius"], -1.0), ["radius"]),
    ("radius-inf", _mutate(["radius"], "inf"), ["radius"]),
    ("input-norm-abc", _mutate(["input_norm"], "abc"), ["input_norm"]),
    ("reg-negative", _mutate(["regularization_smoothness"], -1e-3), ["regularization_smoothness"]),
    ("top-not-object", ["layers"], ["spec"]),
    ("top-string", "abc", ["spec"]),
]


@pytest.mark.parametrize("spec,culprits", [(s, c) for _, s, c in MALFORMED], ids=[name for name, _, _ in MALFORMED])
def test_malformed_spec_raises_chain_error_naming_culprit(spec, culprits):
    with pytest.raises(ChainError) as info:
        parse_spec(spec)
    message = str(info.value)
    for culprit in culprits:
        assert culprit in message, f"{culprit!r} not named in {message!r}"
    assert "\n" not in message


def test_spec_error_is_chain_error():
    assert issubclass(SpecError, ChainError) and issubclass(ChainError, ValueError)
    with pytest.raises(SpecError):
        parse_spec(_mutate(["layers", 0, "bilinear", "smoothness"], -1))


@pytest.mark.parametrize("spelling", ["inf", "Inf", "INF", "+inf", "infinity", "Infinity", " inf "])
def test_spec_infinity_spellings(spelling):
    spec = _mutate(["layers", 0, "nonlinear", 0, "smoothness"], spelling)
    assert parse_spec(spec).chain.layers[0].nonlinear[0].smoothness == INF


def test_spec_defaults_and_names():
    spec = _good_spec()
    del spec["radius"], spec["input_norm"], spec["regularization_smoothness"]
    parsed = parse_spec(spec)
    assert (parsed.chain.radius, parsed.chain.input_norm, parsed.regularization_smoothness) == (1.0, 1.0, 0.0)
    assert [layer.name for layer in parsed.chain.layers] == ["a", "layer2", "layer3"]
    assert parsed.chain.layers[2].nonlinear == ()
    assert parsed.chain.centre == "zero"
    # the json inf token (json.loads("Infinity")) is accepted as a float too
    spec["layers"][0]["bilinear"]["smoothness"] = json.loads("Infinity")
    assert parse_spec(spec).chain.layers[0].bilinear.smoothness == INF
