"""Where does the looseness of the certificates come from? (issue 12, point 1)

For a model, `tight` constants, balls of radius R around the weights w* (RH Cor. 4.5) and the
cross-entropy loss, this script measures

1. per RH layer l the certified m_l, l_l, L_l (RH Prop. 4.4) against estimates of the suprema
   over C (``smoothchain.check``'s method: random points of C plus projected gradient ascent,
   ``smoothchain.estimators`` on the layer prefixes), and their ratio cert/est;
2. the decomposition L_F = L_psi l_f + l_psi^2 L_f (RH Prop. 4.2): each factor certified vs
   estimated, and the two actual terms of grad^2 F(w*) = J^T grad^2 f J (Gauss-Newton) +
   sum_k d_k f grad^2 psi_k (curvature of the chain), each with the product of norms that bounds
   it;
3. inside each layer: Cor. 4.5's ||v*_l||_F against the spectral norm of W*_l (the exact operator
   norm of the convolution, from its dense matrix, and power iteration on the actual conv), the
   bias alone against l_beta^v ||v*_l||, the batch Frobenius norm m_{l-1} against the spectral norm
   of the actual batch input (patch) matrix, the activation's sup |a'|, sup |a''| over R vs over
   the actual pre-activations, over [-m_{l,0}, m_{l,0}] and over sound reachable intervals, and the
   four terms of eq. (21);
4. a family of SOUND sharper recursions ("variants"), each switching on one source's repair,
   alone, all together and all but one, with the L_F each gives: the factor each source costs.

The baseline ``cor45`` is Cor. 4.5 as printed (||v*_l||_F, weights and biases), i.e. the library's
``tight --around-weights`` certificate before commit 798d68c; ``library`` is whatever
``smoothchain.certify`` gives now (recorded, not used).  Every sharper variant is proved in
docs/looseness.md; the script checks that none falls below an estimate (``violations``).

Inputs: ``digits`` (the first ``--batch-size`` training images of ``smoothchain.data.digits``,
their labels, ||x|| = the batch's norm) and ``gaussian`` (exactly what ``smoothchain check`` draws:
``--gaussian-batch-size`` examples, ||x|| = 1, random labels, same seed: its estimates are those
of ``smoothchain check --around-weights --constants tight --radius R --seed S``).

Models: ``mlp`` (built-in 64-32-10 tanh), ``cnn`` (built-in), ``mlp3`` (64-32-32-10 tanh, the
built-in's seeded initialisation of that component list), all with the weights of
``smoothchain.certificate.seeded_module(seed)`` (untrained).

Prints ONE JSON line (``--out`` also writes it; ``--threads`` sets torch's threads, ``--repeats``
of benchmarks/_report.py is ignored).  The default run takes about 2 minutes on one core.  Usage:
``python benchmarks/looseness.py [--models mlp,cnn,mlp3] [--batch-size 32] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as TF
from torch import nn

from smoothchain.certificate import build_chain, certify, seeded_module
from smoothchain.chain import BilinearConstants, Chain
from smoothchain.check import _estimate_chain, _objective_estimate, _random_point, _random_targets, layer_blocks
from smoothchain.components import Linear, Tanh
from smoothchain.estimators import flat_parameters, functional_chain, hessian_top_eig, objective
from smoothchain.losses import rh_loss_constants
from smoothchain.models import BuiltinModel, builtin
from smoothchain.recursion import chain_bounds
from smoothchain.torch_chain import leaf_modules

from _report import emit, parse_args  # benchmarks/_report.py (the script directory is on sys.path)

MARGIN = 1e-9  # relative margin on every norm computed in float64 (as components.NORM_MARGIN)
TANH_D2_PEAK = math.atanh(1 / math.sqrt(3))  # |tanh''| is largest at tanh = 1/sqrt(3)
SOURCES = ("op", "bias", "centre", "vgain", "act", "rows", "joint", "loss", "sample")
SOURCE_TEXT = {
    "op": "Cor. 4.5 input map: L_beta ||v*_l||_F -> exact ||W*_l||_2 (conv: operator norm)",
    "bias": "Cor. 4.5 offset: l_beta^v ||v*_l||_F -> ||beta^v(v*_l)|| = sqrt(rows) ||b*_l||",
    "centre": "output bounds: m_{l,0}, m_l -> value at w* + Lipschitz bound x R sqrt(l)",
    "vgain": "weight gain: L_beta m_{l-1} + l_beta^v -> sqrt((L_beta m_{l-1})^2 + l_beta^v^2), with centre "
             "sigma_max([P(Z*_{l-1}), 1]) + L_beta dev_{l-1} (spectral norm of the batch/patch matrix)",
    "act": "activation sup|a'|, sup|a''| over R -> over sound reachable pre-activation intervals",
    "rows": "eq. (21) curvature term L_a Lip(zeta)^2 -> L_a Lip(zeta) max_k ||grad zeta_k|| (l_inf x l_2)",
    "joint": "eqs. (20)-(21): parameter blocks v_l and w_<l orthogonal (Cauchy-Schwarz), cross-term 2 -> 1",
    "loss": "loss l_f, L_f: sup over all outputs -> over the reachable outputs psi(C) (per-example deviations)",
    "sample": "objective: batch chain constants -> mean over examples of per-example certificates of F_i",
}


def upper(x: float) -> float:
    return float(x) * (1 + MARGIN) + 1e-300


def ratio(c, e):
    if c is None or e is None or e == 0 or math.isinf(c):
        return None
    return c / e


def rnd(x, k=6):
    if x is None:
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return float(f"{x:.{k}g}")


# ----------------------------------------------------------------------------------- models


def make_model(name: str, seed: int):
    if name in ("mlp", "cnn"):
        arch = builtin(name)
        return seeded_module(arch, seed=seed).double(), arch.input_shape
    if name == "mlp3":
        arch = BuiltinModel("mlp3", (Linear(64, 32), Tanh(), Linear(32, 32), Tanh(), Linear(32, 10)),
                            ("fc1", "fc1.act", "fc2", "fc2.act", "fc3"), (64,))
        return seeded_module(arch, seed=seed).double(), arch.input_shape
    raise SystemExit(f"unknown model {name!r}: choose among mlp, cnn, mlp3")


def make_inputs(kind: str, model, shape, batch: int, gauss_batch: int, seed: int):
    """(x, y, generator for the points of C): as check() draws them for 'gaussian'."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        x = torch.randn((gauss_batch,) + tuple(shape), generator=gen, dtype=torch.float64)
        x = x / float(x.norm())
        return x, None, gen  # y drawn after the points, as check() does
    from smoothchain.data import digits

    ds = digits(flatten=len(shape) == 1, dtype=torch.float64, seed=seed)
    x = ds.x_train[:batch].reshape((batch,) + tuple(shape))
    return x, ds.labels_train[:batch].clone(), gen


# ------------------------------------------------------------------- facts at the weights w*


def conv_matrix(conv: nn.Conv2d, in_shape) -> torch.Tensor:
    """The dense matrix of z -> conv(W*, z) (no bias) on one example of shape ``in_shape``."""
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(in_shape))
    out = TF.conv2d(eye, conv.weight.detach(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.reshape(n, -1).T


def conv_power(conv: nn.Conv2d, in_shape, iters: int = 200, seed: int = 0) -> float:
    """Power iteration on the actual convolution (conv then its adjoint): a lower bound."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((1,) + tuple(in_shape), generator=gen, dtype=torch.float64)
    val = 0.0
    for _ in range(iters):
        z = z / z.norm()
        y = TF.conv2d(z, conv.weight.detach(), None, conv.stride, conv.padding, conv.dilation)
        val = float(y.norm())
        z = torch.autograd.grad(TF.conv2d(z.requires_grad_(True), conv.weight.detach(), None, conv.stride,
                                          conv.padding, conv.dilation), z, y)[0].detach()
    return val


def patch_matrix(leaf, z: torch.Tensor) -> torch.Tensor:
    """Rows: the inputs each output coordinate's weights multiply (per example and position)."""
    if isinstance(leaf, nn.Linear):
        return z.reshape(-1, z.shape[-1])
    cols = TF.unfold(z, leaf.kernel_size, leaf.dilation, leaf.padding, leaf.stride)  # (B, c k k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def layer_facts(model, x: torch.Tensor, power: bool = True):
    """Per RH layer, at w*: the bilinear leaf, its input Z*, pre-activation zeta*, output psi_l*,
    the activation, and the norms the variants use."""
    leaves = leaf_modules(model)
    layers, cur = [], x
    with torch.no_grad():
        for _, leaf in leaves:
            if isinstance(leaf, (nn.Linear, nn.Conv2d)):
                z_in = cur
                cur = leaf(cur)
                layers.append({"leaf": leaf, "z_in": z_in, "zeta": cur, "act": None})
            else:
                if layers and layers[-1]["act"] is None and isinstance(leaf, (nn.Tanh, nn.Softplus)):
                    if cur is not layers[-1]["zeta"]:
                        raise SystemExit("an activation that does not follow the bi-affine part directly")
                    layers[-1]["act"] = leaf
                cur = leaf(cur)
            if layers:
                layers[-1]["psi"] = cur
    out = []
    for L in layers:
        leaf, z = L["leaf"], L["z_in"]
        W, b = leaf.weight.detach(), (leaf.bias.detach() if leaf.bias is not None else None)
        frob = math.sqrt(float(W.pow(2).sum()) + (float(b.pow(2).sum()) if b is not None else 0.0))
        if isinstance(leaf, nn.Linear):
            op = float(torch.linalg.matrix_norm(W, ord=2))
            op_power, rows_w, op_library = op, W, None
        else:
            op = float(torch.linalg.matrix_norm(conv_matrix(leaf, z.shape[1:]), ord=2))
            op_power = conv_power(leaf, z.shape[1:]) if power else None
            try:  # the library's sound bound (commit 798d68c; the frequency-domain symbol on the torus)
                from smoothchain.components import conv_operator_bound
                op_library = conv_operator_bound(W, leaf.dilation) if power else None
            except ImportError:
                op_library = None
            rows_w = W.reshape(W.shape[0], -1)
        n_rows = L["zeta"].numel() // (W.shape[0])  # positions x batch each bias entry is added to
        P = patch_matrix(leaf, z)
        P1 = torch.cat([P, torch.ones(P.shape[0], 1, dtype=P.dtype)], 1) if b is not None else P
        out.append({
            "leaf": leaf, "act": L["act"], "zeta": L["zeta"],
            "frob": frob, "frob_weight_only": float(W.norm()), "op": op, "op_power": op_power, "op_library": op_library,
            "bias_offset": math.sqrt(n_rows) * float(b.norm()) if b is not None else 0.0,
            "z_frob": float(z.norm()), "z_sv": float(torch.linalg.matrix_norm(P, ord=2)),
            "z1_sv": float(torch.linalg.matrix_norm(P1, ord=2)),
            "max_patch": float(P.norm(dim=1).max()), "max_row": float(rows_w.norm(dim=1).max()),
            "zeta_norm": float(L["zeta"].norm()), "psi_norm": float(L["psi"].norm()),
            "has_bias": b is not None,
        })
    return out


# ------------------------------------------------------------------ activations on intervals


def act_derivs(act, t: torch.Tensor):
    """(a'(t), a''(t)) for tanh / softplus(beta)."""
    if isinstance(act, nn.Tanh):
        th = torch.tanh(t)
        return 1 - th * th, -2 * th * (1 - th * th)
    beta = float(act.beta)
    s = torch.sigmoid(beta * t)
    return s, beta * s * (1 - s)


def act_sup_on(act, lo: torch.Tensor, hi: torch.Tensor) -> tuple[float, float]:
    """(sup |a'|, sup |a''|) over the union of [lo_k, hi_k]: the max of |g| at the ends and at the
    interior local maxima of |g| (tanh: a' at 0, a'' at +-atanh(1/sqrt 3); softplus: a' increasing,
    a'' at 0), with the relative margin."""
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    d1, d2 = act_derivs(act, torch.cat([lo, hi]))
    s1, s2 = float(d1.abs().max()), float(d2.abs().max())
    peaks1 = (0.0,) if isinstance(act, nn.Tanh) else ()
    peaks2 = (-TANH_D2_PEAK, TANH_D2_PEAK) if isinstance(act, nn.Tanh) else (0.0,)
    for peaks, k in ((peaks1, 0), (peaks2, 1)):
        for c in peaks:
            if bool(((lo <= c) & (c <= hi)).any()):
                v = float(act_derivs(act, torch.tensor([c], dtype=torch.float64))[k].abs())
                s1, s2 = (max(s1, v), s2) if k == 0 else (s1, max(s2, v))
    return upper(s1), upper(s2)


# ------------------------------------------------------------------ the generalised recursion


def lemma_d2(comps, radius, override=None):
    """RH Lemma D.2 on the ball of ``radius``; ``override`` = (l, L) valid on the reachable set
    for component 0 (an element-wise activation applied to zeta): used for its Lipschitz factor and
    its smoothness only, never in the ball branches ||grad a(0)|| + L m (which need the ball)."""
    bounds, lips = [float(radius)], []
    for a in comps:
        mp = bounds[-1]
        bounds.append(min(a.bound, a.value_at_zero + a.lipschitz * mp,
                          a.value_at_zero + (a.jacobian_at_zero + a.smoothness * mp) * mp))
        lips.append(min(a.lipschitz, a.jacobian_at_zero + a.smoothness * mp))
    smooths = [a.smoothness for a in comps]
    if override is not None and comps:
        lips[0] = min(lips[0], override[0])
        smooths[0] = min(smooths[0], override[1])
    prod = math.prod(lips)
    smooth = 0.0
    for j in range(len(comps)):
        if smooths[j] == 0:
            continue
        smooth += smooths[j] * math.prod(lips[:j]) ** 2 * math.prod(lips[j + 1:])
    return bounds[-1], prod, smooth


def recursion(chain0: Chain, facts, flags: frozenset, detail: bool = False, sample_rows=None):
    """RH Prop. 4.4 around the weights (Cor. 4.5), with the repairs named in ``flags`` (SOURCES).

    With no flag it is Cor. 4.5 as printed on the tight constants (checked against
    ``smoothchain.recursion.chain_bounds``).  Per layer l (zeta_l = b_l(v_l, z_{l-1}), its value at
    w* known):
      z_gain = L_beta R + l_beta^z + [L_beta ||v*||_F | ||W*||_op]
      v_gain = L_beta m_{l-1} + l_beta^v  | sqrt((L_beta m_{l-1})^2 + l_beta^v^2)              (vgain)
               and with centre also  <= sigma_max([P(Z*_{l-1}), 1]) + L_beta dev_{l-1}
      Lip(zeta) = z_gain l_{l-1} + v_gain | sqrt((z_gain l_{l-1})^2 + v_gain^2)          (joint)
      L(zeta)   = z_gain L_{l-1} + 2 L_beta l_{l-1} | sigma_max([[z_gain L, L_beta l], [L_beta l, 0]])
      l_l = l_a Lip(zeta),  L_l = l_a L(zeta) + L_a Lip(zeta) [Lip(zeta) | min(Lip, rows)]   (rows)
    with dev_l = l_l R sqrt(l) >= sup_C ||z_l - z*_l|| (||w - w*|| <= R sqrt(l) on the first l
    layers) and rows >= sup_C max_k ||grad zeta_{l,k}||: per coordinate k of example i,
    sqrt((max patch of z*_{l-1,i} + dev_{l-1})^2 + [bias] + ((max_c ||W*_c|| + R) l_{l-1})^2), and
    with ``sample_rows`` (each example's own recursion, batch of one) the max over i of example i's
    value, whose dev and l_{l-1} are example i's.
    """
    R = chain0.radius
    m_prev, l_prev, L_prev, dev_prev = chain0.input_norm, 0.0, 0.0, 0.0
    rows_out = []
    for i, (layer, f) in enumerate(zip(chain0.layers, facts), start=1):
        b = layer.bilinear
        Lb, lv, lz, b0 = b.smoothness, b.weight_lipschitz, b.input_lipschitz, b.offset_norm
        zmap = upper(f["op"]) if "op" in flags else Lb * f["frob"]
        off = upper(f["bias_offset"]) if "bias" in flags else lv * f["frob"]
        z_gain = Lb * R + lz + zmap
        v_gain = Lb * m_prev + lv
        if "vgain" in flags:
            # weight and bias blocks orthogonal: ||beta(dW, Z) + beta^v(db)|| <= sqrt((L_b |Z|)^2 + lv^2)
            v_gain = math.hypot(Lb * m_prev, lv)
            if "centre" in flags:  # the actual batch (patch) matrix with its ones column, + deviation
                v_gain = min(v_gain, upper(f["z1_sv"] if f["has_bias"] else f["z_sv"]) + Lb * dev_prev)
        m0 = Lb * R * m_prev + lv * R + (lz + zmap) * m_prev + b0 + off
        if "joint" in flags:
            lip_z = math.hypot(z_gain * l_prev, v_gain)
            A, B = z_gain * L_prev, Lb * l_prev
            L_z = (A + math.sqrt(A * A + 4 * B * B)) / 2
        else:
            lip_z = z_gain * l_prev + v_gain
            L_z = z_gain * L_prev + 2 * Lb * l_prev
        reach = R * math.sqrt(i)
        dev_z = lip_z * reach
        # sup_C max_k ||grad zeta_k||: per coordinate, blocks v_l and w_<l are orthogonal
        rows = math.sqrt((upper(f["max_patch"]) + dev_prev) ** 2 + (1.0 if f["has_bias"] else 0.0)
                         + ((upper(f["max_row"]) + R) * l_prev) ** 2)
        if sample_rows is not None:  # a coordinate of example i: example i's own bound
            rows = min(rows, sample_rows[i - 1])
        if "centre" in flags:
            m0 = min(m0, upper(f["zeta_norm"]) + dev_z)
        override, act_reach = None, None
        if "act" in flags and f["act"] is not None:
            delta = min(lip_z, rows) * reach  # |zeta_k(w) - zeta_k(w*)| <= ||grad zeta_k|| ||w - w*||
            zs = f["zeta"]
            override = act_sup_on(f["act"], zs - delta * (1 + MARGIN), zs + delta * (1 + MARGIN))
            act_reach = {"delta": delta, "sup_d1": override[0], "sup_d2": override[1]}
        m_l, lip_a, smooth_a = lemma_d2(layer.nonlinear, m0, override)
        lip = lip_a * lip_z
        quad = smooth_a * lip_z * (min(lip_z, rows) if "rows" in flags else lip_z)
        smooth = lip_a * L_z + quad
        if "centre" in flags:
            m_l = min(m_l, upper(f["psi_norm"]) + lip * reach)
        row = {"m": m_l, "l": lip, "L": smooth, "rows": rows}
        if detail:
            t1 = L_prev * z_gain * lip_a
            t2 = z_gain ** 2 * smooth_a * l_prev ** 2
            t3 = 2 * (v_gain * z_gain * smooth_a + Lb * lip_a) * l_prev
            t4 = v_gain ** 2 * smooth_a
            row.update({"m0": m0, "z_gain": z_gain, "v_gain": v_gain, "lip_a": lip_a, "smooth_a": smooth_a,
                        "l_a*L_zeta": lip_a * L_z, "curvature_part": quad,
                        "lip_zeta": lip_z, "L_zeta": L_z, "act_reach": act_reach,
                        "eq21_terms": {"L_prev*z_gain*l_a": t1, "z_gain^2*L_a*l_prev^2": t2,
                                       "2(v_gain*z_gain*L_a+L_beta*l_a)*l_prev": t3, "v_gain^2*L_a": t4,
                                       "of_which_2*L_beta*l_a*l_prev": 2 * Lb * lip_a * l_prev}})
        rows_out.append(row)
        m_prev, l_prev, L_prev, dev_prev = m_l, lip, smooth, lip * reach
    return {"layers": rows_out, "m_psi": m_prev, "l_psi": l_prev, "L_psi": L_prev}


def variant(flags, chain0, facts, samples, loss_facts, detail=False):
    """The certificate with the repairs ``flags``: the chain (``recursion``) and L_F.

    Loss (cross-entropy, mean over n examples, f = (1/n) sum_i f_i): without "loss", per example
    l_{f_i} = sqrt 2 and L_{f_i} = 1/2 (docs/tight-constants.md Sec. 8).  With "loss", on the
    reachable outputs (||psi_i(w) - psi_i(w*)|| <= dev_i = l_{psi_i} R sqrt(tau)):
    L_{f_i} <= min(1/2, lambda_max(grad^2 f_i(z*_i)) + dev_i, max_j p*_ij exp(sqrt 2 dev_i)) and
    l_{f_i} <= min(sqrt 2, ||p*_i - y_i|| + L_{f_i} dev_i).  Batch: l_f = sqrt(sum_i l_{f_i}^2) / n,
    L_f = max_i L_{f_i} / n, L_F = L_psi l_f + l_psi^2 L_f (RH Prop. 4.2).  With "sample" also
    L_F <= (1/n) sum_i (L_{psi_i} l_{f_i} + l_{psi_i}^2 L_{f_i}) (F is the mean of the F_i; each
    psi_i the chain on example i alone) and the smaller is kept.
    """
    flags = frozenset(flags)
    chain_flags = flags - {"loss", "sample"}
    per = [recursion(c, f, chain_flags) for c, f in samples] if flags & {"loss", "sample", "rows", "act"} else None
    sample_rows = None
    if per is not None and flags & {"rows", "act"}:
        sample_rows = [max(p["layers"][k]["rows"] for p in per) for k in range(len(chain0.layers))]
    ch = recursion(chain0, facts, chain_flags, detail, sample_rows)
    n, tau, R = len(loss_facts), len(ch["layers"]), chain0.radius
    reach = R * math.sqrt(tau)
    lfi, Lfi = [math.sqrt(2.0)] * n, [0.5] * n
    if "loss" in flags:
        for i, lf in enumerate(loss_facts):
            dev = min(ch["l_psi"], per[i]["l_psi"]) * reach
            Lfi[i] = min(0.5, upper(lf["lam"] + dev), upper(lf["p_max"] * math.exp(math.sqrt(2) * dev)))
            lfi[i] = min(math.sqrt(2.0), upper(lf["grad"]) + Lfi[i] * dev)
    l_f = min(math.sqrt(2.0 / n), math.sqrt(sum(v * v for v in lfi)) / n)
    L_f = max(Lfi) / n
    term1, term2 = ch["L_psi"] * l_f, ch["l_psi"] ** 2 * L_f
    out = dict(ch, l_f=l_f, L_f=L_f, term_curvature=term1, term_gauss_newton=term2, L_F_batch=term1 + term2,
               L_F=term1 + term2)
    if "sample" in flags:
        out["L_F_per_sample"] = sum(p["L_psi"] * a + p["l_psi"] ** 2 * b for p, a, b in zip(per, lfi, Lfi)) / n
        out["L_F"] = min(out["L_F"], out["L_F_per_sample"])
    return out


# ------------------------------------------------------------------------------ estimates


def estimate_layers(model, x, shape, pts, centre, blocks, R, a):
    """check()'s per-layer estimates (max over the points of C and ascent) for every prefix."""
    _, ends = layer_blocks(model, shape)
    leaves = leaf_modules(model)
    out = []
    for li, end in enumerate(ends):
        is_last = li == len(ends) - 1
        prefix = model if is_last else nn.Sequential(*[m for _, m in leaves[:end]])
        psi_full, _ = functional_chain(prefix, x)
        n = sum(p.numel() for p in prefix.parameters())
        psi = psi_full if is_last else (lambda w, f=psi_full, n=n: f(w[:n]))
        best = _estimate_chain(psi, pts, centre, blocks, R, a.ascent_steps, a.iters, a.seed)
        out.append({"m": best["output_bound"][0], "l": best["lipschitz"][0], "L": best["smoothness"][0]})
    return out


def ce_loss_facts(z: torch.Tensor, y: torch.Tensor):
    """At the outputs z (n x k): ||grad f||, lambda_max(grad^2 f) (exact), max_ij p_ij."""
    n = z.shape[0]
    p = torch.softmax(z, -1)
    g = (p - TF.one_hot(y, z.shape[-1]).to(z.dtype)) / n
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    lam = float(torch.linalg.eigvalsh(H).max()) / n
    return float(g.norm()), lam, float(p.max())


def pre_activations(model, w, x):
    """The pre-activations zeta_l (outputs of the bi-affine parts) of every layer, at the flat weights w."""
    m = _with_weights(model, w)
    outs, cur = [], x
    with torch.no_grad():
        leaves = leaf_modules(m)
        for _, leaf in leaves:
            cur = leaf(cur)
            if isinstance(leaf, (nn.Linear, nn.Conv2d)):
                outs.append(cur)
    return outs


def _with_weights(model, w):
    import copy

    m = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(w, m.parameters())
    return m


# ------------------------------------------------------------------------------------- run


def run_one(name: str, kind: str, a) -> dict:
    t0 = time.perf_counter()
    R = a.radius
    model, shape = make_model(name, a.seed)
    x, y, gen = make_inputs(kind, model, shape, a.batch_size, a.gaussian_batch_size, a.seed)
    n = x.shape[0]
    xnorm = float(x.norm())
    blocks, _ = layer_blocks(model, shape)
    w_star = flat_parameters(model)
    pts = [_random_point(w_star, blocks, R, gen, boundary=(i % 2 == 0)) for i in range(a.points)]
    if y is None:
        y = _random_targets(model, x, "cross-entropy", 1.0, gen)

    # ---- certificates
    chain0 = build_chain(model, input_shape=shape, batch_size=n, mode="tight", radius=R, input_norm=xnorm)
    facts = layer_facts(model, x)
    if len(facts) != len(chain0.layers):
        raise SystemExit(f"{name}: {len(facts)} bi-affine layers found but the chain has {len(chain0.layers)}")
    lib = certify(model, input_shape=shape, batch_size=n, radius=R, input_norm=xnorm, mode="tight",
                  around_weights=True)
    lc = rh_loss_constants("cross-entropy", batch_size=n, output_bound=1.0, mode="tight")
    with torch.no_grad():
        z_star = model(x)
    g_norm, lam_f, p_max = ce_loss_facts(z_star, y)
    loss_facts = []
    for i in range(n):
        gi, li, pi = ce_loss_facts(z_star[i:i + 1], y[i:i + 1])  # one example: n = 1, no 1/n
        loss_facts.append({"grad": gi, "lam": li, "p_max": pi})
    samples = [(build_chain(model, input_shape=shape, batch_size=1, mode="tight", radius=R,
                            input_norm=float(x[i].norm())), layer_facts(model, x[i:i + 1], power=False))
               for i in range(n)]
    base = variant((), chain0, facts, samples, loss_facts, detail=True)
    # the no-flag recursion is Cor. 4.5 as printed: check it against the library's recursion
    frob_chain = Chain(tuple(
        type(L)(BilinearConstants(L.bilinear.smoothness, L.bilinear.weight_lipschitz,
                                  L.bilinear.input_lipschitz + L.bilinear.smoothness * f["frob"],
                                  L.bilinear.offset_norm + L.bilinear.weight_lipschitz * f["frob"]),
                L.nonlinear, L.name) for L, f in zip(chain0.layers, facts)), input_norm=xnorm, radius=R)
    ref = chain_bounds(frob_chain)
    for mine, theirs in zip(base["layers"], ref.layers):
        for k, attr in (("m", "output_bound"), ("l", "lipschitz"), ("L", "smoothness")):
            if not math.isclose(mine[k], getattr(theirs, attr), rel_tol=1e-12):
                raise SystemExit(f"{name}: baseline recursion {k} differs from chain_bounds")
    if not math.isclose(base["L_F"], ref.smoothness * lc.lipschitz + ref.lipschitz ** 2 * lc.smoothness, rel_tol=1e-12):
        raise SystemExit(f"{name}: baseline L_F differs from RH Prop. 4.2 on the library's constants")

    # ---- estimates over C (check()'s method) and at w*
    est_layers = estimate_layers(model, x, shape, pts, w_star, blocks, R, a)
    F = objective(model, x, y, loss="cross-entropy")
    LF_est, LF_where = _objective_estimate(F, pts, w_star, blocks, R, a.ascent_steps, a.iters, a.seed)
    LF_star = hessian_top_eig(F, w_star, iters=a.iters, seed=a.seed).value
    LF_est = max(LF_est, LF_star)
    psi, _ = functional_chain(model, x)
    g_star = ((torch.softmax(z_star, -1) - TF.one_hot(y, z_star.shape[-1]).to(z_star.dtype)) / n).reshape(-1)
    curvature_term = hessian_top_eig(lambda w: psi(w).dot(g_star), w_star, iters=a.iters, seed=a.seed).value
    zf = z_star.reshape(-1)

    def gn(w):  # Hessian at w* is J^T grad^2 f(z*) J exactly (the residual psi(w*) - z* is 0)
        d = psi(w) - zf
        return 0.5 * d.dot(_hf_vec(z_star, y, d))

    gn_term = hessian_top_eig(gn, w_star, iters=a.iters, seed=a.seed).value
    # loss factors over the points of C
    g_pts, lam_pts = [g_norm], [lam_f]
    zeta_pts = [[f["zeta"] for f in facts]]
    for w in pts:
        with torch.no_grad():
            zw = psi(w).reshape(z_star.shape)
        gp, lp, _ = ce_loss_facts(zw, y)
        g_pts.append(gp)
        lam_pts.append(lp)
        zeta_pts.append(pre_activations(model, w, x))

    # ---- per-layer table, baseline and library
    layers = []
    for li, (row, est, f, lb) in enumerate(zip(base["layers"], est_layers, facts, lib.bounds.layers)):
        layers.append({
            "layer": lb.name,
            "cert": {k: rnd(row[k]) for k in "mlL"}, "est": {k: rnd(est[k]) for k in "mlL"},
            "ratio": {k: rnd(ratio(row[k], est[k]), 4) for k in "mlL"},
            "library_cert": {"m": rnd(lb.output_bound), "l": rnd(lb.lipschitz), "L": rnd(lb.smoothness)},
            "at_weights": {"psi_norm": rnd(f["psi_norm"]), "zeta_norm": rnd(f["zeta_norm"]),
                           "m0_cert": rnd(row["m0"])},
        })

    # ---- attribution inside layers
    attrib = []
    for li, (row, f, layer) in enumerate(zip(base["layers"], facts, chain0.layers), start=1):
        Lb = layer.bilinear.smoothness
        item = {
            "layer": layers[li - 1]["layer"],
            "bilinear": {
                "L_beta": rnd(Lb), "frob_v": rnd(f["frob"]), "frob_W": rnd(f["frob_weight_only"]),
                "op_W_exact": rnd(f["op"]), "op_W_power": rnd(f["op_power"]),
                "op_W_library_bound": rnd(f["op_library"]),
                "input_map_cor45": rnd(Lb * f["frob"]), "input_map_factor": rnd((Lb * f["frob"]) / f["op"], 4),
                "offset_cor45": rnd(layer.bilinear.weight_lipschitz * f["frob"]),
                "offset_bias_only": rnd(f["bias_offset"]),
                "z_gain": rnd(row["z_gain"]), "v_gain": rnd(row["v_gain"]),
            },
            "batch": {
                # the weight gain ||dv -> b(v, Z)||: RH's L_beta m_{l-1} + l_beta^v, its value at the
                # actual Z* with the Frobenius norm, with the blocks (W, b) orthogonal, and exact
                "m_prev_cert": rnd(base["layers"][li - 2]["m"] if li > 1 else xnorm),
                "Z_frob_at_w": rnd(f["z_frob"]), "P_spectral_at_w": rnd(f["z_sv"]),
                "L_beta_Z_frob_over_P_spectral": rnd(Lb * f["z_frob"] / f["z_sv"], 4),
                "v_gain_cert": rnd(row["v_gain"]),
                "v_gain_frob_at_w": rnd(Lb * f["z_frob"] + layer.bilinear.weight_lipschitz),
                "v_gain_blocks_at_w": rnd(math.hypot(Lb * f["z_frob"], layer.bilinear.weight_lipschitz)),
                "v_gain_exact_at_w": rnd(f["z1_sv"] if f["has_bias"] else f["z_sv"]),
                "max_row_grad_zeta_bound": rnd(row["rows"]), "lip_zeta_cert": rnd(row["lip_zeta"]),
            },
            "eq21_terms": {k: rnd(v) for k, v in row["eq21_terms"].items()},
        }
        if f["act"] is not None:
            zs = f["zeta"]
            d1, d2 = act_derivs(f["act"], zs)
            reached = torch.cat([p[li - 1].reshape(-1) for p in zeta_pts])
            e1, e2 = act_derivs(f["act"], reached)
            s_glob = act_sup_on(f["act"], torch.tensor([-1e6]), torch.tensor([1e6]))
            s_m0 = act_sup_on(f["act"], torch.tensor([-row["m0"]]), torch.tensor([row["m0"]]))
            item["activation"] = {
                "type": type(f["act"]).__name__,
                "sup_d1_R": rnd(s_glob[0]), "sup_d2_R": rnd(s_glob[1]),
                "sup_d1_ball_m0": rnd(s_m0[0]), "sup_d2_ball_m0": rnd(s_m0[1]),
                "max_d1_at_w": rnd(float(d1.abs().max())), "max_d2_at_w": rnd(float(d2.abs().max())),
                "max_d1_points": rnd(float(e1.abs().max())), "max_d2_points": rnd(float(e2.abs().max())),
                "preact_abs_max_at_w": rnd(float(zs.abs().max())),
                "preact_range_at_w": [rnd(float(zs.min())), rnd(float(zs.max()))],
                "lip_a_cert": rnd(row["lip_a"]), "smooth_a_cert": rnd(row["smooth_a"]),
            }
        attrib.append(item)

    # ---- variants: each repair alone, all, all but one, in sequence
    def LF(flags):
        return variant(flags, chain0, facts, samples, loss_facts)

    full = variant(SOURCES, chain0, facts, samples, loss_facts, detail=True)
    variants = {"cor45": base, "all": full, "op+bias": LF({"op", "bias"})}  # op+bias: the library since 798d68c
    sources = []
    for s in SOURCES:
        alone, loo = LF({s}), LF(set(SOURCES) - {s})
        variants[s] = alone
        sources.append({"source": s, "what": SOURCE_TEXT[s],
                        "alone_factor": rnd(base["L_F"] / alone["L_F"], 4),
                        "leave_one_out_factor": rnd(loo["L_F"] / full["L_F"], 4)})
    # greedy sequence: at each step the repair with the largest gain on top of the previous ones
    seq, on, cur = [], set(), base["L_F"]
    while len(on) < len(SOURCES):
        best = max((s for s in SOURCES if s not in on), key=lambda s: cur / LF(on | {s})["L_F"])
        new = LF(on | {best})["L_F"]
        seq.append({"source": best, "factor": rnd(cur / new, 4), "L_F_after": rnd(new)})
        on.add(best)
        cur = new
    sources.sort(key=lambda d: -d["alone_factor"])

    # ---- soundness of the variants against the estimates
    violations = []
    for vname, v in variants.items():
        for row, est, lay in zip(v["layers"], est_layers, layers):
            for k in "mlL":
                if est[k] > row[k] * (1 + 1e-6):
                    violations.append({"variant": vname, "layer": lay["layer"], "q": k, "cert": row[k], "est": est[k]})
        if LF_est > v["L_F"] * (1 + 1e-6):
            violations.append({"variant": vname, "q": "L_F", "cert": v["L_F"], "est": LF_est})

    def vsummary(v):
        return {"layers": [{k: rnd(r[k]) for k in "mlL"} for r in v["layers"]],
                "l_f": rnd(v["l_f"]), "L_f": rnd(v["L_f"]), "L_F": rnd(v["L_F"]),
                "ratio_L_F": rnd(v["L_F"] / LF_est, 4)}

    lib_LF = lib.objective.smoothness
    try:  # the library's local certificate (commit db35daa), recorded for comparison when present
        from smoothchain.local import certify_local

        loc = certify_local(model, x, y, loss="cross-entropy", radius=R)
        local = {"L_F": rnd(loc.objective.smoothness), "ratio": rnd(loc.objective.smoothness / LF_est, 4),
                 "layers": [{"m": rnd(b.output_bound), "l": rnd(b.lipschitz), "L": rnd(b.smoothness)}
                            for b in loc.bounds.layers],
                 "l_f": rnd(loc.objective.loss_lipschitz), "L_f": rnd(loc.objective.loss_smoothness)}
        if loc.objective.smoothness * (1 + 1e-6) < LF_est:
            violations.append({"variant": "library_local", "q": "L_F", "cert": loc.objective.smoothness, "est": LF_est})
    except ImportError:
        local = None
    l_est, L_est = est_layers[-1]["l"], est_layers[-1]["L"]
    doc = {
        "model": name, "inputs": kind, "batch": n, "input_norm": rnd(xnorm), "radius": R,
        "layers": layers,
        "objective": {
            "L_F_cert": rnd(base["L_F"]), "L_F_est": rnd(LF_est), "L_F_at_w": rnd(LF_star),
            "ratio": rnd(base["L_F"] / LF_est, 4), "L_F_est_where": LF_where,
            "library_L_F": rnd(lib_LF), "library_ratio": rnd(lib_LF / LF_est, 4),
            "all_repairs_L_F": rnd(full["L_F"]), "all_repairs_ratio": rnd(full["L_F"] / LF_est, 4),
            "library_local": local,
        },
        "decomposition": {
            "cert": {"L_psi": rnd(base["L_psi"]), "l_f": rnd(base["l_f"]), "l_psi": rnd(base["l_psi"]),
                     "L_f": rnd(base["L_f"]), "term_L_psi*l_f": rnd(base["term_curvature"]),
                     "term_l_psi^2*L_f": rnd(base["term_gauss_newton"])},
            "est": {"L_psi": rnd(L_est), "l_psi": rnd(l_est),
                    "grad_f_at_w": rnd(g_norm), "grad_f_max_points": rnd(max(g_pts)),
                    "hess_f_at_w": rnd(lam_f), "hess_f_max_points": rnd(max(lam_pts)), "p_max_at_w": rnd(p_max),
                    "product_L_psi*grad_f": rnd(L_est * max(g_pts)),
                    "product_l_psi^2*hess_f": rnd(l_est ** 2 * max(lam_pts)),
                    "actual_curvature_term_at_w": rnd(curvature_term),
                    "actual_gauss_newton_term_at_w": rnd(gn_term)},
            "ratios": {"L_psi": rnd(ratio(base["L_psi"], L_est), 4), "l_psi": rnd(ratio(base["l_psi"], l_est), 4),
                       "l_f_vs_grad_f": rnd(base["l_f"] / max(g_pts), 4),
                       "L_f_vs_hess_f": rnd(base["L_f"] / max(lam_pts), 4),
                       "term_L_psi*l_f_vs_actual": rnd(ratio(base["term_curvature"], curvature_term), 4),
                       "term_l_psi^2*L_f_vs_actual": rnd(ratio(base["term_gauss_newton"], gn_term), 4)},
        },
        "attribution": attrib,
        "sources": sources,
        "sequence": seq,
        "variants": {k: vsummary(v) for k, v in variants.items()},
        "all_repairs_detail": [
            {k: (rnd(v) if k != "act_reach" else (None if v is None else {a: rnd(b) for a, b in v.items()}))
             for k, v in r.items() if k != "eq21_terms"} for r in full["layers"]],
        "violations": violations,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return doc


def _hf_vec(z_star: torch.Tensor, y, d: torch.Tensor) -> torch.Tensor:
    """grad^2 f(z*) d for the mean cross-entropy: (1/n) (diag(p_i) - p_i p_i^T) d_i, p at z*."""
    n = z_star.shape[0]
    p = torch.softmax(z_star, -1).detach()
    D = d.reshape(z_star.shape)
    out = p * D - p * (p * D).sum(-1, keepdim=True)
    return out.reshape(-1) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,mlp3")
    ap.add_argument("--inputs", default="digits,gaussian")
    ap.add_argument("--batch-size", type=int, default=32, help="digits batch (default 32)")
    ap.add_argument("--gaussian-batch-size", type=int, default=1, help="check()'s batch (default 1)")
    ap.add_argument("--radius", type=float, default=0.1)
    ap.add_argument("--points", type=int, default=3, help="random points of C (check's default 3)")
    ap.add_argument("--ascent-steps", type=int, default=8, help="ascent steps per point (check's default 8)")
    ap.add_argument("--iters", type=int, default=60, help="power/Lanczos iterations (check's default 60)")
    a = parse_args(ap, argv, repeats=1)
    t0 = time.perf_counter()
    runs = [run_one(m, k, a) for m in a.models.split(",") for k in a.inputs.split(",")]
    doc = {"benchmark": "looseness", "settings": {"constants": "tight", "around_weights": True, "radius": a.radius,
                                                  "loss": "cross-entropy", "seed": a.seed, "batch_size": a.batch_size,
                                                  "gaussian_batch_size": a.gaussian_batch_size, "points": a.points,
                                                  "ascent_steps": a.ascent_steps, "iters": a.iters,
                                                  "threads": a.threads, "torch": torch.__version__},
           "runs": runs, "seconds": round(time.perf_counter() - t0, 1)}
    emit(doc, a.out)


if __name__ == "__main__":
    main()
