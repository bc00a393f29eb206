"""``camfunc run``: CAM methods over a whole dataset, in resumable shards, under torchrun too.

Under torchrun: ``torchrun --nproc-per-node 4 -m camfunc run DATA --out DIR ...``.
``python -m camfunc.cli._run`` runs this subcommand alone, with the same arguments.
"""

from __future__ import annotations

import argparse
import sys

from camfunc.cli._common import Subparsers, call_handler
from camfunc.cli._explain import add_model_arguments
from camfunc.models import UsageError

HELP = "explain a dataset in resumable shards (single process or under torchrun)"


def run_command(args: argparse.Namespace) -> int:
    from camfunc.runs import run

    try:
        result = run(
            args.data, args.out, model=args.model, weights=args.weights, layer=args.layer,
            size=args.size, pretrained_cfg=args.pretrained_cfg, mean=args.mean, std=args.std,
            methods=args.method or ["gradcam"], classes=args.classes,
            metrics=args.metrics, batch_size=args.batch_size, shard_size=args.shard_size,
            num_workers=args.workers, map_dtype=args.map_dtype, upsample=args.upsample,
            seed=args.seed, device=args.device, compile=args.compile,
            compile_backend=args.compile_backend, progress=not args.no_progress,
            exif=not args.no_exif, decode=args.decode)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    if _is_rank_zero():
        print(result)
    return 1 if result.failed else 0


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="an ImageFolder-layout folder (ROOT/CLASS/IMAGE), or "
                                     "scenes:N[:SEED] for the embedded model's generated scenes")
    parser.add_argument("--out", required=True,
                        help="output folder; run again with the same arguments to resume")
    add_model_arguments(parser)
    parser.add_argument("--method", action="append",
                        help="a camfunc method (repeatable; default gradcam)")
    parser.add_argument("--classes", default="predicted",
                        help="true, predicted or topK, e.g. top3 (default predicted)")
    parser.add_argument("--metrics", action="store_true",
                        help="per-image average drop / increase in confidence, and pointing "
                             "games for scenes")
    parser.add_argument("--shard-size", type=int, default=256,
                        help="dataset indices per shard file (default 256)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes (default 0)")
    parser.add_argument("--map-dtype", default="float16", choices=["float16", "uint8", "float32"],
                        help="how maps are stored (default float16)")
    parser.add_argument("--upsample", action="store_true",
                        help="store maps at the input's resolution instead of the layer's")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of random methods' per-image noise and of random weights")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if "
                                         "available, else cpu)")
    parser.add_argument("--compile", action="store_true", help="run methods through torch.compile")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor)")
    parser.add_argument("--decode", default="auto", choices=["auto", "pillow", "device"],
                        help="where JPEGs are decoded: device (torchvision, batched), pillow "
                             "(the loader's workers), or auto: device on CUDA (default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help=HELP,
        description="Explain every image of a dataset with CAM methods; write maps in shard "
                    "files, index.csv, metrics.csv and manifest.json. Resumable; under torchrun "
                    "each rank takes its share of the shards.")
    add_arguments(parser)
    parser.set_defaults(handler=run_command)


def main(argv: list[str] | None = None) -> int:
    """``python -m camfunc.cli._run ...``: the subcommand alone (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="camfunc run", description=HELP)
    add_arguments(parser)
    parser.set_defaults(handler=run_command)
    return call_handler(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
