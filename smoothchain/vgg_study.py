"""The VGG-16 study of RH Sec. 5: VGG, VGG-smooth and VGG with batch normalisation.

Certifies ``vgg16``, ``vgg16-smooth`` and ``vgg16-bn`` at eps = 1e-2 and 1e2 (m = 128, R = 1,
||x|| = 1 by default) in both constant modes and checks RH's qualitative claims:

1. l_VGG ~ l_VGG-smooth (RH short version Sec. 5.2: "the only difference ... resides in the
   constant a_softplus(0) != 0"); we call two bounds "comparable" when they are within one
   order of magnitude (|log10 ratio| <= 1) and report the ratio;
2. for eps = 1e-2: l_VGG-smooth <= l_VGG-bn and L_VGG-smooth <= L_VGG-bn (RH Sec. 5.2);
3. for eps = 1e2: l_VGG-smooth >= l_VGG-bn and L_VGG-smooth >= L_VGG-bn.

RH's "VGG" in Sec. 5.2 of the long version is the smooth VGG of Sec. 5.1, so the batch-norm
comparison is against ``vgg16-smooth``.  Pure arithmetic: the whole study takes milliseconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .certificate import certify
from .report import atomic_write_text, fmt_number, legend_below, new_figure, save_figure

__all__ = ["StudyRow", "Claim", "VGGStudy", "run_vgg_study", "local_vgg_rows", "write_vgg_study"]

VARIANTS = (("vgg16", None), ("vgg16-smooth", None), ("vgg16-bn", 1e-2), ("vgg16-bn", 1e2))


@dataclass(frozen=True)
class Claim:
    mode: str
    statement: str
    holds: bool
    detail: str


@dataclass(frozen=True)
class StudyRow:
    model: str
    bn_eps: float | None
    mode: str
    output_bound: float
    lipschitz: float
    smoothness: float
    objective_smoothness: float

    @property
    def label(self) -> str:
        return self.model if self.bn_eps is None else f"{self.model} (eps={self.bn_eps:g})"


@dataclass(frozen=True)
class VGGStudy:
    rows: tuple[StudyRow, ...]
    claims: tuple[Claim, ...]
    batch_size: int
    radius: float
    input_norm: float


def _log10_ratio(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return 0.0
    if math.isinf(a) or math.isinf(b) or a == 0 or b == 0:
        return math.inf
    return abs(math.log10(a / b))


def run_vgg_study(*, batch_size: int = 128, radius: float = 1.0, input_norm: float = 1.0,
                  local: tuple[str, ...] = (), seed: int = 0) -> VGGStudy:
    """Certify the four VGG variants in both modes and evaluate RH Sec. 5's claims; with
    ``local`` (centres among :data:`LOCAL_CENTRES`), also the rows of :func:`local_vgg_rows`
    for each centre (minutes of CPU each; the claims stay those of paper and tight)."""
    for centre in local:
        if centre not in LOCAL_CENTRES:
            raise ValueError(f"local centres are {', '.join(LOCAL_CENTRES)}, got {centre!r}")
    rows: list[StudyRow] = []
    claims: list[Claim] = []
    for mode in ("paper", "tight"):
        found: dict[tuple[str, float | None], StudyRow] = {}
        for model, eps in VARIANTS:
            cert = certify(
                model, batch_size=batch_size, radius=radius, input_norm=input_norm, mode=mode,
                bn_eps=eps if eps is not None else 1e-5,
            )
            row = StudyRow(
                model, eps, mode, cert.bounds.output_bound, cert.bounds.lipschitz, cert.bounds.smoothness,
                cert.objective.smoothness,
            )
            rows.append(row)
            found[(model, eps)] = row
        vgg, smooth = found[("vgg16", None)], found[("vgg16-smooth", None)]
        r = _log10_ratio(vgg.lipschitz, smooth.lipschitz)
        claims.append(
            Claim(mode, "l_VGG ~ l_VGG-smooth (within one order of magnitude)", r <= 1.0,
                  f"l_VGG / l_VGG-smooth = {vgg.lipschitz / smooth.lipschitz:.3g}")
        )
        for eps, sign in ((1e-2, "<="), (1e2, ">=")):
            bn = found[("vgg16-bn", eps)]
            for attr, sym in (("lipschitz", "l"), ("smoothness", "L")):
                a, b = getattr(smooth, attr), getattr(bn, attr)
                holds = a <= b if sign == "<=" else a >= b
                claims.append(
                    Claim(mode, f"eps={eps:g}: {sym}_VGG-smooth {sign} {sym}_VGG-bn", holds, f"{a:.3e} vs {b:.3e}")
                )
    for centre in local:
        rows.extend(local_vgg_rows(batch_size=batch_size, radius=radius, input_norm=input_norm, seed=seed,
                                   centre=centre))
    return VGGStudy(tuple(rows), tuple(claims), batch_size, radius, input_norm)


#: the weights a local row is centred at: all zero (the balls of the study's other rows) or
#: PyTorch's default initialisation
LOCAL_CENTRES = ("zero", "init")


def local_vgg_rows(*, batch_size: int = 128, radius: float = 1.0, input_norm: float = 1.0, seed: int = 0,
                   centre: str = "zero", chunk_size: int | None = None) -> tuple[StudyRow, ...]:
    """``vgg16-smooth`` certified on one batch around given weights: the ``local`` row
    (docs/local.md) and, for ``centre="init"``, the ``tight`` row around the same weights.

    The batch: ``batch_size`` standard normal 3 x 224 x 224 images scaled to ||x|| =
    ``input_norm``, uniform labels (both drawn from ``seed``), cross-entropy loss.  ``centre``:
    ``"zero"`` -- every weight 0, so the set is the study's own (balls of radius ``radius``
    around 0, RH Prop. 4.4) and the rows compare on the same C; ``"init"`` -- PyTorch's default
    initialisation drawn from ``seed`` (:func:`~smoothchain.certificate.seeded_module`), the
    network one starts training from.  Needs torch and minutes of CPU (a forward and a backward
    of the batch in float64, the Gram matrices of the convolutions' patches)."""
    import torch

    from .certificate import certify, seeded_module
    from .local import certify_local

    if centre not in LOCAL_CENTRES:
        raise ValueError(f"centre must be one of {', '.join(LOCAL_CENTRES)}, got {centre!r}")
    net = seeded_module("vgg16-smooth", seed=seed)
    if centre == "zero":
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(batch_size, 3, 224, 224, generator=gen, dtype=torch.float64)
    x *= input_norm / float(x.norm())
    y = torch.randint(0, 1000, (batch_size,), generator=gen)
    label = f"vgg16-smooth @ {centre}"
    rows = []
    if centre == "init":
        tight = certify(net, input_shape=(3, 224, 224), batch_size=batch_size, radius=radius,
                        input_norm=input_norm, mode="tight", around_weights=True)
        rows.append(StudyRow(label, None, "tight", tight.bounds.output_bound, tight.bounds.lipschitz,
                             tight.bounds.smoothness, tight.objective.smoothness))
    cert = certify_local(net, x, y, radius=radius, chunk_size=chunk_size)
    rows.append(StudyRow(label, None, "local", cert.bounds.output_bound, cert.bounds.lipschitz,
                         cert.bounds.smoothness, cert.objective.smoothness))
    return tuple(rows)


def _fmt(x: float) -> str:
    return fmt_number(x, ".3e")


def study_markdown(study: VGGStudy, png_name: str | None = None) -> str:
    lines = [
        "# VGG-16 smoothness study (RH Sec. 5)",
        "",
        f"Batch m = {study.batch_size}, radius R = {study.radius:g}, input norm ||x|| = {study.input_norm:g}, "
        "balls around 0 (RH Prop. 4.4), cross-entropy loss.",
        "",
        "| model | constants | m (output bound) | l (Lipschitz) | L (smoothness) | L_F (objective) |",
        "|---|---|---|---|---|---|",
    ]
    for r in study.rows:
        lines.append(
            f"| {r.label} | {r.mode} | {_fmt(r.output_bound)} | {_fmt(r.lipschitz)} | {_fmt(r.smoothness)} | "
            f"{_fmt(r.objective_smoothness)} |"
        )
    lines += ["", "## RH's claims", "", "| constants | claim | holds | values |", "|---|---|---|---|"]
    for c in study.claims:
        lines.append(f"| {c.mode} | {c.statement} | {'yes' if c.holds else '**no**'} | {c.detail} |")
    lines += [
        "",
        "Notes. `vgg16` (ReLU, max pooling) is not C^1, so its smoothness is infinite in both modes. "
        "In `paper` mode the smooth network's bounds are smaller than VGG's mostly because average "
        "pooling is linear with ||grad a(0)|| = 1/2, which Lemma D.2 exploits, while max pooling keeps 1. "
        "Batch normalisation caps every layer's output (m_batch) and scales by at most 2 eps^-1/2 (paper) "
        "or eps^-1/2 (tight): with eps = 1e2 this shrinks the bounds, with eps = 1e-2 it inflates them.",
    ]
    if any(r.mode == "local" for r in study.rows):
        lines += [
            "",
            "`local` rows (docs/local.md) certify one batch (standard normal images scaled to ||x||, seed 0) "
            "on balls around given weights: `@ zero` -- every weight 0, the same balls as the rows above; "
            "`@ init` -- PyTorch's default initialisation, next to the `tight` bound around the same weights.",
        ]
    if png_name:
        lines += ["", f"![certified constants, log scale]({png_name})"]
    return "\n".join(lines) + "\n"


def plot_vgg_study(study: VGGStudy, path: Path) -> None:
    """Log-scale grouped bar chart of l and L per variant and mode (infinite bars hatched at the top)."""
    from matplotlib.patches import Patch

    labels = list(dict.fromkeys(r.label for r in study.rows))
    modes = list(dict.fromkeys(r.mode for r in study.rows))
    fig = new_figure(figsize=(12 + 1.5 * (len(labels) > 4), 4.8))
    axes = fig.subplots(1, 2)
    for ax, attr, title in zip(axes, ("lipschitz", "smoothness"), ("Lipschitz constant l", "Smoothness L")):
        finite = [getattr(r, attr) for r in study.rows if not math.isinf(getattr(r, attr))]
        top = max(finite) * 100 if finite else 10.0
        width = 0.8 / len(modes)
        for k, mode in enumerate(modes):
            found = [(labels.index(r.label), getattr(r, attr)) for r in study.rows if r.mode == mode]
            xs = [i + (k - (len(modes) - 1) / 2) * width for i, _ in found]
            heights = [top if math.isinf(v) else v for _, v in found]
            bars = ax.bar(xs, heights, width, color=f"C{k}", log=True)
            for bar, (_, v) in zip(bars, found):
                if math.isinf(v):
                    bar.set_hatch("//")
                    ax.annotate("inf", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, fontsize=8, ha="right")
        ax.set_title(f"{title} (m={study.batch_size}, R={study.radius:g})")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=f"C{k}", label=f"{mode} constants") for k, mode in enumerate(modes)]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="infinite (not C^1)"))
    fig.suptitle("VGG-16 variants: certified constants (RH Sec. 5)")
    legend_below(fig, handles, [h.get_label() for h in handles], ncol=len(handles), top=0.95)
    save_figure(fig, path, dpi=120)


def write_vgg_study(study: VGGStudy, out_dir: str | Path, *, plot: bool = True) -> dict[str, str]:
    """Write ``vgg_study.md``, ``vgg_study.json`` and (if ``plot``) ``vgg_study.png`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    png = out / "vgg_study.png"
    if plot:
        plot_vgg_study(study, png)
        files["png"] = str(png)
    md = out / "vgg_study.md"
    atomic_write_text(md, study_markdown(study, png.name if plot else None))
    files["markdown"] = str(md)
    js = out / "vgg_study.json"
    atomic_write_text(js, json.dumps(study_to_dict(study), indent=2))
    files["json"] = str(js)
    return files


def study_to_dict(study: VGGStudy) -> dict:
    from .spec import json_number

    def row(r: StudyRow) -> dict:
        d = asdict(r)
        return {k: (json_number(v) if isinstance(v, float) else v) for k, v in d.items()}

    return {
        "batch_size": study.batch_size,
        "radius": study.radius,
        "input_norm": study.input_norm,
        "rows": [row(r) for r in study.rows],
        "claims": [asdict(c) for c in study.claims],
    }
