"""``conceptlens explain --server HOST:PORT IMAGE [--class C] [--contrast B] [--html OUT]``.

Prints the top predictions and, per explained class, the table concept / presence / weight /
contribution and the identity logit = sum of contributions + residual + bias. ``--html OUT``
also asks the server for heatmap overlays and prototype JPEGs and writes a self-contained page.
Exit status 0, 1 when the server answers with an error, 2 for usage errors.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import CLIError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="JPEG, PNG or WebP file")
    parser.add_argument("--server", default="localhost:50051", help="HOST:PORT of the service (default: %(default)s)")
    parser.add_argument("--class", dest="classes", action="append", metavar="C",
                        help="class id or name to explain (repeatable; default: the top prediction)")
    parser.add_argument("--top-k", type=int, default=None, help="explain the top K predictions (0: predictions only)")
    parser.add_argument("--contrast", default=None, metavar="B", help="explain 'class rather than B'")
    parser.add_argument("--concepts", type=int, default=0, help="show at most this many concepts per class (0: all)")
    parser.add_argument("--prototypes", type=int, default=None, help="prototypes per concept")
    parser.add_argument("--predictions", type=int, default=5, help="top predictions to show (default: %(default)s)")
    parser.add_argument("--html", default=None, metavar="OUT", help="write an HTML page with heatmaps and prototypes")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON instead of tables")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    parser.add_argument("--tls-ca", default=None, help="PEM CA bundle of the server (switches TLS on)")
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM client key (mutual TLS)")
    parser.add_argument("--max-message-bytes", type=int, default=16 << 20, help="largest gRPC message")


def format_answer(resp) -> str:
    """The text report of an ExplainResponse."""
    lines = [f"bundle {resp.bundle_id}{'  (cached answer)' if resp.cache_hit else ''}", "",
             f"{'prediction':<32} {'id':>5} {'logit':>9} {'prob':>7}"]
    for p in resp.predictions:
        lines.append(f"{p.class_name[:32]:<32} {p.class_id:>5} {p.logit:>9.3f} {p.probability:>7.3f}")
    for x in resp.explanations:
        lines.append("")
        head = f"{x.class_name} (class {x.class_id})"
        if x.HasField("contrast_class_id"):
            head += f" rather than {x.contrast_class_name} (class {x.contrast_class_id})"
        lines.append(head + (f"  [{x.method}]" if x.method else ""))
        if "no_concepts" in x.flags:
            lines.append("  (the bundle has no concepts for this class: all of the logit is residual)")
        elif x.flags:
            lines.append(f"  ! evaluation flags: {', '.join(x.flags)} (do not trust this explanation)")
        lines.append(f"  {'concept':>7} {'presence':>10} {'weight':>10} {'contribution':>13}")
        for c in x.concepts:
            lines.append(f"  {c.concept_id:>7} {c.presence:>10.4f} {c.weight:>10.4f} {c.contribution:>13.4f}")
        total = sum(c.contribution for c in x.concepts)
        lhs = "logit" if not x.HasField("contrast_class_id") else "logit difference"
        omitted = f" + {x.omitted_contribution:.4f} (other concepts)" if x.omitted_contribution else ""
        lines.append(f"  {lhs} {x.logit:.4f} = {total:.4f} (Σ contributions){omitted} + {x.residual:.4f} "
                     f"(residual) + {x.bias:.4f} (bias);  relative residual {x.relative_residual:.1%}")
    t = resp.timings
    lines.append("")
    lines.append(f"server: {t.total_seconds * 1e3:.1f} ms (decode {t.decode_seconds * 1e3:.1f}, queue "
                 f"{t.queue_seconds * 1e3:.1f}, inference {t.inference_seconds * 1e3:.1f}, explain "
                 f"{t.explain_seconds * 1e3:.1f}, encode {t.encode_seconds * 1e3:.1f}, cache {t.cache_seconds * 1e3:.1f})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from .client import ExplainClient
    from .html import render_page

    path = Path(args.image)
    if not path.is_file():
        raise CLIError(f"image {path} does not exist")
    classes = args.classes or []
    if isinstance(classes, str):  # from CONCEPTLENS_CLASS=a,b
        classes = [c for c in classes.split(",") if c]
    image = path.read_bytes()
    options = dict(classes=classes, top_k=args.top_k, contrast=args.contrast, max_concepts=args.concepts,
                   prototypes=args.prototypes, num_predictions=args.predictions)
    if args.html:
        options.update(heatmaps="png", prototype_jpeg=True)
    try:
        with ExplainClient(args.server, token=args.token, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                           tls_key=args.tls_key, max_message_bytes=args.max_message_bytes,
                           timeout=args.timeout) as client:
            resp = client.explain(image, **options)
    except grpc.RpcError as e:
        print(f"conceptlens explain: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=1))
    else:
        print(format_answer(resp))
    if args.html:
        Path(args.html).write_text(render_page(image, resp, title=f"conceptlens: {path.name}"))
        print(f"\nwrote {args.html}", file=sys.stderr)
    return 0
