"""``hqdit evaluate``: metrics of a sample batch against a reference batch, both ADM ``.npz`` files.

::

    hqdit evaluate SAMPLES.npz --reference VIRTUAL_imagenet256_labeled.npz --inception-weights PATH
    hqdit evaluate SAMPLES.npz --reference heldout.npz --proxy          # embedded model: FID*, sFID*, ...

Without ``--proxy`` the ADM Inception-v3 is used, its weights read from ``--inception-weights``,
``$HQDIT_INCEPTION_WEIGHTS`` or torch's hub cache (see :mod:`.features`). The table is printed to
stdout (proxy metrics starred, with a footnote naming the network); ``--json`` also writes the report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .adm import evaluate
from .features import InceptionExtractor, ProxyExtractor


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``hqdit`` sub-command parser."""
    p = subparsers.add_parser(
        "evaluate",
        help="FID, sFID, IS, precision/recall of a sample .npz against a reference .npz",
        description="FID, sFID, Inception Score and precision/recall of a sample batch against a reference "
                    "batch, both ADM .npz files (arr_0: uint8 NHWC images). Proxy metrics are starred.",
    )
    p.add_argument("samples", type=Path, metavar="SAMPLES.npz", help="ADM sample batch (arr_0: uint8 NHWC)")
    p.add_argument("--reference", type=Path, required=True, metavar="REF.npz",
                   help="ADM reference batch: arr_0 images and/or mu, sigma, mu_s, sigma_s")
    net = p.add_mutually_exclusive_group()
    net.add_argument("--inception-weights", type=Path, metavar="PATH",
                     help="weights-inception-2015-12-05-6726825d.pth (default: $HQDIT_INCEPTION_WEIGHTS or torch hub cache)")
    net.add_argument("--proxy", action="store_true",
                     help="use the embedded model's proxy network (starred metrics: FID*, sFID*, IS*, P*, R*)")
    p.add_argument("--proxy-path", type=Path, metavar="DIR",
                   help="proxy network folder or .safetensors (default: $HQDIT_PROXY or data/embedded/proxy)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="cpu", help="torch device of the feature network (default cpu)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the report as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table; returns the exit code (0 ok, 1 bad input or missing weights)."""
    if args.proxy_path is not None and not args.proxy:
        print("hqdit evaluate: --proxy-path needs --proxy", file=sys.stderr)
        return 1
    try:
        if args.proxy:
            extractor = ProxyExtractor(path=args.proxy_path, device=args.device)
        else:
            extractor = InceptionExtractor(args.inception_weights, device=args.device)
        report = evaluate(args.samples, args.reference, extractor, batch_size=args.batch_size, progress=True)
    except (FileNotFoundError, ValueError, TypeError, KeyError, RuntimeError) as err:
        print(f"hqdit evaluate: {err}", file=sys.stderr)
        return 1
    # 4 decimals; a rounding-level negative distance (-1e-12) prints as 0.0000, not -0.0000.
    print(report.to_frame().to_string(index=False, float_format=lambda v: f"{v:.4f}".replace("-0.0000", "0.0000")))
    print(report.footnote())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0
