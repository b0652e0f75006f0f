"""``hqdit evaluate``: metrics of a sample batch against a reference batch, both ADM ``.npz`` files.

::

    hqdit evaluate SAMPLES.npz --reference VIRTUAL_imagenet256_labeled.npz --inception-weights PATH
    hqdit evaluate SAMPLES.npz --reference embedded --proxy             # embedded model: FID*, sFID*, ...

Without ``--proxy`` the ADM Inception-v3 is used, its weights read from ``--inception-weights``,
``$HQDIT_INCEPTION_WEIGHTS`` or torch's hub cache (see :mod:`.features`). ``--reference embedded`` (with
``--proxy``) is the embedded data set's held-out split (:func:`~hqdit_utils.runs.digits.embedded_reference`), the
reference of every metric of the book. The table is printed to stdout (proxy metrics starred, with a
footnote naming the network); ``--json`` also writes the report (strict JSON: NaN written as null).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli_common import CliError, require_device, with_fix
from ..runs.digits import embedded_reference
from ..files import write_json_atomic
from ..metrics.adm import evaluate
from ..metrics.features import InceptionExtractor, ProxyExtractor

#: ``--reference`` value that names the embedded data set's held-out images.
EMBEDDED_REFERENCE = "embedded"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``hqdit`` sub-command parser."""
    p = subparsers.add_parser(
        "evaluate",
        help="FID, sFID, IS, precision/recall of a sample .npz against a reference .npz",
        description="FID, sFID, Inception Score and precision/recall of a sample batch against a reference "
                    "batch, both ADM .npz files (arr_0: uint8 NHWC images). Proxy metrics are starred.",
    )
    p.add_argument("samples", type=Path, metavar="SAMPLES.npz", help="ADM sample batch (arr_0: uint8 NHWC)")
    p.add_argument("--reference", required=True, metavar="REF.npz",
                   help="ADM reference batch: arr_0 images and/or mu, sigma, mu_s, sigma_s; or 'embedded' (with "
                        "--proxy): the embedded data set's held-out images")
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


def _reference(args: argparse.Namespace):
    """The reference batch ``--reference`` names: the embedded held-out images, or a ``.npz`` path."""
    if args.reference == EMBEDDED_REFERENCE:
        if not args.proxy:
            raise CliError("--reference embedded is the embedded model's digits, which only the proxy network "
                           "measures (add --proxy)")
        return embedded_reference("heldout")
    path = Path(args.reference)
    if not path.is_file():
        raise CliError(f"reference batch {path} not found (pass --reference REF.npz, or --reference embedded "
                       "--proxy for the embedded model)")
    return path


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table; returns 0 (expected errors raise :class:`~hqdit_utils.commands.cli_common.CliError`)."""
    if args.proxy_path is not None and not args.proxy:
        raise CliError("--proxy-path needs --proxy (add --proxy, or drop --proxy-path)")
    if not args.samples.is_file():
        raise CliError(f"sample batch {args.samples} not found (write one with hqdit sample --out {args.samples})")
    require_device(args.device)
    reference = _reference(args)
    try:
        if args.proxy:
            extractor = ProxyExtractor(path=args.proxy_path, device=args.device)
        else:
            extractor = InceptionExtractor(args.inception_weights, device=args.device)
        report = evaluate(args.samples, reference, extractor, batch_size=args.batch_size, progress=True)
    except (ValueError, TypeError, KeyError) as err:  # bad images or batches (adm.evaluate's documented errors)
        raise with_fix(err, "check the files named: samples and reference are ADM .npz batches of uint8 NHWC "
                            "images") from None
    # 4 decimals; a rounding-level negative distance (-1e-12) prints as 0.0000, not -0.0000.
    print(report.to_frame().to_string(index=False, float_format=lambda v: f"{v:.4f}".replace("-0.0000", "0.0000")))
    print(report.footnote())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, report.to_dict())
    return 0
