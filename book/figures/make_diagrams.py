"""Draw the book's two schematic diagrams (no data, no network): run from anywhere,

    python book/figures/make_diagrams.py

and it (re)writes, next to this script,

* ``dit-block.svg`` / ``dit-block.png`` — one DiT block with adaLN-Zero conditioning, marking which
  tensors the HQ-DiT W4A4 recipe of this book quantizes to 4 bits, which stay FP32, and where the online
  Hadamard rotation ``x Q`` and the offline ``W Q`` (the ``Qᵀ`` of ``(xQ)(WQ)ᵀ``) sit;
* ``hqdit-pipeline.svg`` / ``hqdit-pipeline.png`` — the post-training quantization pipeline from
  calibration to metrics, with the chapter that teaches each step.

Which parts are the paper's and which are ours is said in the chapters; the figures show the layer set
and the order of operations of this book's ``hqdit-w4a4`` recipe (``hqdit_utils.recipes``).
The output is deterministic (fixed SVG hash salt, no date in the metadata).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent

# Colours: the book's E2M1 orange (hqdit_utils.plotting.FORMAT_COLORS) marks 4-bit tensors.
FOUR_BIT = "#ff7f0e"
FOUR_BIT_FILL = "#ffe0c2"
FP32_FILL = "#eeeeee"
FP32_EDGE = "#555555"
COND_FILL = "#dceaf7"
COND_EDGE = "#1f77b4"
ROT = "#d62728"
ROT_FILL = "#fbdada"

plt.rcParams.update({
    "font.size": 9.5,
    "font.family": "DejaVu Sans",
    "svg.hashsalt": "hqdit-diagrams",
    "svg.fonttype": "path",
})


def box(ax, x, y, w, h, text, *, fill=FP32_FILL, edge=FP32_EDGE, lw=1.2, size=9.5, weight="normal", ls="-"):
    """A rounded box centred at (x, y) with centred text; returns its (left, right, bottom, top)."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                fc=fill, ec=edge, lw=lw, ls=ls, zorder=2))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, fontweight=weight, zorder=3)
    return x - w / 2, x + w / 2, y - h / 2, y + h / 2


def arrow(ax, start, end, *, color="k", lw=1.2, style="-|>", ls="-", connection="arc3", shrink=0.0):
    ax.annotate("", xy=end, xytext=start, zorder=1,
                arrowprops=dict(arrowstyle=style, color=color, lw=lw, ls=ls, connectionstyle=connection,
                                shrinkA=shrink, shrinkB=shrink, mutation_scale=11))


def circle(ax, x, y, text, size=19):
    """A round node (a marker, so it stays round whatever the axes' aspect)."""
    ax.plot([x], [y], marker="o", ms=size, mfc="white", mec="k", mew=1.2, zorder=2)
    ax.text(x, y, text, ha="center", va="center", fontsize=12, zorder=3)


def save(fig, name: str) -> None:
    fig.savefig(HERE / f"{name}.svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight", pad_inches=0.1)
    fig.savefig(HERE / f"{name}.png", dpi=150, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# (a) one DiT block
# --------------------------------------------------------------------------------------------------
def dit_block() -> None:
    fig, ax = plt.subplots(figsize=(12.2, 13.2))
    ax.set_xlim(0, 12.2)
    ax.set_ylim(0, 26.4)
    ax.axis("off")

    X = 6.2          # main column
    W = 4.6          # width of the main boxes
    RX = 9.3         # residual line
    CX = 1.55        # conditioning column

    ys = {}
    rows = [
        ("h", 25.5), ("ln1", 24.2), ("mod1", 23.0), ("rot_qkv", 21.8), ("qkv", 20.5), ("attn", 18.7),
        ("rot_proj", 16.9), ("proj", 15.7), ("gate1", 14.4), ("add1", 13.3), ("ln2", 12.1), ("mod2", 10.9),
        ("rot_fc1", 9.7), ("fc1", 8.5), ("gelu", 7.2), ("rot_fc2", 6.0), ("fc2", 4.8), ("gate2", 3.5),
        ("add2", 2.4), ("out", 1.2),
    ]
    for k, y in rows:
        ys[k] = y

    def rot(key, n):
        box(ax, X, ys[key], 2.9, 0.62, f"× Q   (online Hadamard, order {n})", fill=ROT_FILL, edge=ROT, size=8.8)

    def linear(key, title, shape):
        box(ax, X, ys[key], W, 0.95, f"{title}\n4-bit input (x Q)  ·  4-bit weight (W Q)ᵀ   {shape}",
            fill=FOUR_BIT_FILL, edge=FOUR_BIT, lw=2.0, size=9.0)

    box(ax, X, ys["h"], 3.6, 0.7, "tokens h   [N × d]", fill="white", weight="bold")
    box(ax, X, ys["ln1"], 3.0, 0.62, "LayerNorm (no affine)")
    box(ax, X, ys["mod1"], 3.0, 0.62, "LN(h) · (1 + γ₁) + β₁", fill=COND_FILL, edge=COND_EDGE)
    rot("rot_qkv", "d")
    linear("qkv", "qkv = to_q, to_k, to_v", "d → 3d")
    box(ax, X, ys["attn"], W, 1.55,
        "multi-head attention core (FP32)\nsplit into heads\nS = Q_h K_hᵀ / √d_h    →    P = softmax(S)\n"
        "O_h = P V_h    →    merge heads", size=9.0)
    rot("rot_proj", "d")
    linear("proj", "proj = to_out", "d → d")
    box(ax, X, ys["gate1"], 2.2, 0.6, "× α₁  (gate)", fill=COND_FILL, edge=COND_EDGE)
    circle(ax, X, ys["add1"], "+")
    box(ax, X, ys["ln2"], 3.0, 0.62, "LayerNorm (no affine)")
    box(ax, X, ys["mod2"], 3.0, 0.62, "LN(h) · (1 + γ₂) + β₂", fill=COND_FILL, edge=COND_EDGE)
    rot("rot_fc1", "d")
    linear("fc1", "fc1 (MLP in)", "d → 4d")
    box(ax, X, ys["gelu"], 2.6, 0.62, "GELU (tanh approx.)")
    rot("rot_fc2", "4d")
    linear("fc2", "fc2 (MLP out)", "4d → d")
    box(ax, X, ys["gate2"], 2.2, 0.6, "× α₂  (gate)", fill=COND_FILL, edge=COND_EDGE)
    circle(ax, X, ys["add2"], "+")
    box(ax, X, ys["out"], 3.6, 0.7, "tokens h′   [N × d]", fill="white", weight="bold")

    # main flow
    order = [k for k, _ in rows]
    half = {"h": 0.35, "out": 0.35, "attn": 0.78, "qkv": 0.48, "proj": 0.48, "fc1": 0.48, "fc2": 0.48,
            "add1": 0.28, "add2": 0.28, "gate1": 0.3, "gate2": 0.3}
    for a, b in zip(order, order[1:]):
        arrow(ax, (X, ys[a] - half.get(a, 0.31)), (X, ys[b] + half.get(b, 0.31)))
    # residuals
    for top, add in [("h", "add1"), ("add1", "add2")]:
        y0 = ys[top] - (0.0 if top == "h" else 0.0)
        x0 = X + (1.8 if top == "h" else 0.3)
        ax.plot([x0, RX, RX], [y0, y0, ys[add]], color="k", lw=1.2, zorder=1)
        arrow(ax, (RX, ys[add]), (X + 0.3, ys[add]))
    ax.text(RX + 0.12, (ys["h"] + ys["add1"]) / 2, "residual", rotation=90, va="center", fontsize=8.5)
    ax.text(RX + 0.12, (ys["add1"] + ys["add2"]) / 2, "residual", rotation=90, va="center", fontsize=8.5)

    # conditioning column
    box(ax, CX - 0.62, 25.5, 1.15, 0.62, "timestep t", fill="white", edge=COND_EDGE, size=8.8)
    box(ax, CX + 0.68, 25.5, 1.25, 0.62, "class y\n(or null ∅)", fill="white", edge=COND_EDGE, size=8.3)
    box(ax, CX - 0.62, 24.1, 1.15, 0.95, "sin/cos\n+ MLP", fill=COND_FILL, edge=COND_EDGE, size=8.5)
    box(ax, CX + 0.68, 24.1, 1.25, 0.95, "embedding\ntable", fill=COND_FILL, edge=COND_EDGE, size=8.5)
    arrow(ax, (CX - 0.62, 25.19), (CX - 0.62, 24.58))
    arrow(ax, (CX + 0.68, 25.19), (CX + 0.68, 24.58))
    circle(ax, CX, 22.8, "+", size=16)
    arrow(ax, (CX - 0.62, 23.62), (CX - 0.15, 23.0))
    arrow(ax, (CX + 0.68, 23.62), (CX + 0.15, 23.0))
    ax.text(CX + 0.35, 22.25, "c", fontsize=10, style="italic")
    box(ax, CX, 21.0, 2.3, 1.0, "SiLU → adaLN linear\nd → 6d   (FP32)", fill=COND_FILL, edge=COND_EDGE, size=8.8)
    arrow(ax, (CX, 22.55), (CX, 21.5))
    box(ax, CX, 19.6, 2.5, 0.85, "β₁ γ₁ α₁ β₂ γ₂ α₂\n(one d-vector each)", fill="white", edge=COND_EDGE, size=8.6)
    arrow(ax, (CX, 20.5), (CX, 20.03))
    # the six vectors feed the modulations and gates
    bus = CX + 1.7  # a vertical bus carries the six vectors to the modulations and gates
    ax.plot([CX + 1.25, bus], [19.6, 19.6], color=COND_EDGE, lw=1.0, ls="--", zorder=1)
    ax.plot([bus, bus], [ys["mod1"], ys["gate2"]], color=COND_EDGE, lw=1.0, ls="--", zorder=1)
    for key, lab in [("mod1", "β₁, γ₁"), ("gate1", "α₁"), ("mod2", "β₂, γ₂"), ("gate2", "α₂")]:
        xe = X - (1.5 if key.startswith("mod") else 1.1)
        arrow(ax, (bus, ys[key]), (xe, ys[key]), color=COND_EDGE, lw=1.0, ls="--")
        ax.text((bus + xe) / 2, ys[key] + 0.14, lab, color=COND_EDGE, fontsize=8.5, ha="center")
    ax.text(CX, 17.6, "adaLN-Zero: the adaLN linear\nstarts at zero, so α₁ = α₂ = 0\nand every block "
            "starts as\nthe identity", ha="center", va="top", fontsize=8.2, color="#333333",
            bbox=dict(fc="white", ec="#bbbbbb", boxstyle="round,pad=0.3"))

    # annotations on the right: why the rotation cannot be folded
    notes = {
        "rot_qkv": "online: follows\nthe per-sample\nmodulation",
        "rot_proj": "online: a full-order Q\ncannot be folded\ninto to_v",
        "rot_fc1": "online: follows\nthe per-sample\nmodulation",
        "rot_fc2": "online: follows\nGELU",
    }
    for key, txt in notes.items():
        ax.text(X + 1.55, ys[key], txt, fontsize=7.4, color=ROT, va="center", ha="left", linespacing=1.0)

    # legend / key
    lx, ly = 9.75, 25.8
    ax.text(lx, ly, "Key (this book's W4A4 recipe)", fontsize=9.5, fontweight="bold", va="top")
    items = [
        (FOUR_BIT_FILL, FOUR_BIT, "4-bit FP: weight and its input\nactivation (4 linears per block)"),
        (FP32_FILL, FP32_EDGE, "FP32: LayerNorm, attention\nmatmuls QKᵀ and PV, softmax,\nGELU, residual adds"),
        (COND_FILL, COND_EDGE, "FP32: adaLN-Zero conditioning\n(embedders, adaLN linear,\nmodulation, gates)"),
        (ROT_FILL, ROT, "online rotation x ↦ x Q of a\nquantized linear's input"),
    ]
    y = ly - 0.9
    for fill, edge, text in items:
        box(ax, lx + 0.25, y, 0.4, 0.4, "", fill=fill, edge=edge, lw=1.5)
        ax.text(lx + 0.6, y + 0.2, text, fontsize=8.2, va="top")
        y -= 1.55
    ax.text(lx, y + 0.2,
            "The weight side is rotated once,\noffline: the stored 4-bit weight\nis W Q, so the layer computes\n"
            "(x Q)(W Q)ᵀ = x Q Qᵀ Wᵀ = x Wᵀ:\nthe Qᵀ sits in the weight.\n\n"
            "Outside the blocks, FP32:\npatch embedding, positional\nembedding, final adaLN layer\n"
            "and linear. Not shown: biases\n(FP32, added after the matmul).\n\n"
            "Q_h, K_h, V_h: one head's queries,\nkeys and values (not the rotation Q).\n\n"
            "d = 144, N = 64 (embedded);\nd = 1152, N = 256 (DiT-XL/2, 256 px)",
            fontsize=8.2, va="top")
    ax.set_title("One DiT block (adaLN-Zero) and what HQ-DiT W4A4 quantizes, as this book implements it",
                 fontsize=11, loc="left")
    save(fig, "dit-block")


# --------------------------------------------------------------------------------------------------
# (b) the HQ-DiT pipeline
# --------------------------------------------------------------------------------------------------
def pipeline() -> None:
    fig, ax = plt.subplots(figsize=(12.8, 6.2))
    ax.set_xlim(0, 12.8)
    ax.set_ylim(-0.6, 5.6)
    ax.axis("off")
    steps = [
        ("1  Calibration trajectories",
         "sample the FP32 model (DDPM,\ncfg); record the inputs X of\nevery block linear at timesteps\nspread over the schedule",
         "ch. 1", FP32_FILL, FP32_EDGE),
        ("2  Per-layer statistics",
         "per layer: weight W [out × in],\ncalibration rows X [n × in],\nranges, crest factors",
         "ch. 1", FP32_FILL, FP32_EDGE),
        ("3  Rotation",
         "random Hadamard Q per input\nwidth: W ← W Q (offline),\nX ← X Q (online at run time)",
         "ch. 4", ROT_FILL, ROT),
        ("4  Clipping search",
         "per candidate format: α = γ·max\nfor weights (per row) and\nactivations (per tensor)",
         "ch. 2–3", FOUR_BIT_FILL, FOUR_BIT),
        ("5  Format selection",
         "per layer: E1M2, E2M1 or E3M0,\nthe lowest error after clipping",
         "ch. 2–3", FOUR_BIT_FILL, FOUR_BIT),
        ("6  GPTQ on the FP grid",
         "weights rounded column by\ncolumn with error feedback\n(Hessian of the rotated X);\nα fixed in step 4",
         "ch. 5", FOUR_BIT_FILL, FOUR_BIT),
        ("7  Quantized model",
         "each block linear: online x Q,\n4-bit activation, stored 4-bit\nweight W Q; the rest FP32",
         "ch. 6", FOUR_BIT_FILL, FOUR_BIT),
        ("8  Sampling and metrics",
         "images from the same seeds;\nlayer errors, FID*, sFID, IS,\nprecision/recall vs FP32",
         "ch. 6–7", FP32_FILL, FP32_EDGE),
    ]
    bw, bh = 2.9, 1.95
    xs = [1.55, 4.75, 7.95, 11.15]
    ys = [4.15, 1.45]
    pos = [(xs[i], ys[0]) for i in range(4)] + [(xs[3 - i], ys[1]) for i in range(4)]
    for (title, body, chap, fill, edge), (x, y) in zip(steps, pos):
        ax.add_patch(FancyBboxPatch((x - bw / 2, y - bh / 2), bw, bh, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    fc=fill, ec=edge, lw=1.6, zorder=2))
        ax.text(x - bw / 2 + 0.12, y + bh / 2 - 0.15, title, ha="left", va="top", fontsize=10, fontweight="bold", zorder=3)
        ax.text(x - bw / 2 + 0.12, y + bh / 2 - 0.5, body, ha="left", va="top", fontsize=8.6, zorder=3)
        ax.text(x + bw / 2 - 0.1, y - bh / 2 + 0.1, chap, ha="right", va="bottom", fontsize=8.5, color="#444444",
                style="italic", zorder=3)
    for i in range(3):
        arrow(ax, (pos[i][0] + bw / 2, pos[i][1]), (pos[i + 1][0] - bw / 2, pos[i + 1][1]), lw=1.6)
    arrow(ax, (pos[3][0], pos[3][1] - bh / 2), (pos[4][0], pos[4][1] + bh / 2), lw=1.6)
    for i in range(4, 7):
        arrow(ax, (pos[i][0] - bw / 2, pos[i][1]), (pos[i + 1][0] + bw / 2, pos[i + 1][1]), lw=1.6)
    ax.text(6.35, -0.5, "Steps 3–6 run once per block linear, offline, on the rotated W and X; clipping and format are chosen\n"
            "for the weight and for the activation separately. Orange: the steps that make the 4-bit tensors.",
            ha="center", va="bottom", fontsize=8.5, color="#333333")
    ax.set_title("The HQ-DiT post-training quantization pipeline as this book runs it (recipe hqdit-w4a4)",
                 fontsize=11, loc="left")
    save(fig, "hqdit-pipeline")


if __name__ == "__main__":
    dit_block()
    pipeline()
    print("wrote", ", ".join(sorted(p.name for p in HERE.glob("*.svg"))))
