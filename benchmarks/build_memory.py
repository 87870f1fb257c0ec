"""A build's memory against the plan that ``protoad_export.build.resources`` checks before it starts.

Runs one whole build in this process and prints, as JSON (GiB): the resident memory when the check
runs (model loaded, nothing extracted yet), FINCH's planned bytes, the IVF's 16-bit copy, the peak
(``builder.peak_rss_mib``) and the growth after the check. The plan must cover the growth.

    python benchmarks/build_memory.py ../shared/data/magnetic_tile --backbone efficientnet_lite0
    python benchmarks/build_memory.py DIR_OF_200_IMAGES --backbone wide_resnet50_2 --weights random
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from protoad_export.build import pipeline as builder, resources
from protoad_export.build.pipeline import BuildConfig, build, peak_rss_mib
from protoad_export.data.images import Preprocessing


def _rss() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--resize-mode", default="letterbox")
    args = parser.parse_args()
    seen: dict = {}
    checked = resources.check_build_resources

    def check(n_features, n_clustered, dim, out, on_cpu, max_prototypes, memory=None, disk=None):
        seen.update(patches=n_clustered, dim=dim, rss_at_check=_rss(), copy=2 * n_clustered * dim,
                    planned=resources.finch_memory(n_clustered, dim, n_clustered < n_features, on_cpu),
                    available=resources.available_memory())
        return checked(n_features, n_clustered, dim, out, on_cpu, max_prototypes, memory, disk)

    builder.check_build_resources = check
    start = time.time()
    config = BuildConfig(input="tensor", backbone=args.backbone, weights=args.weights, holdout=0.0, device="cpu",
                         preprocessing=Preprocessing(mode=args.resize_mode))
    with tempfile.TemporaryDirectory() as out:
        build(args.data, "build_memory", out, config, log=None, progress=False)
    seen["peak"] = int(peak_rss_mib() * 2**20)
    seen["growth"] = seen["peak"] - seen["rss_at_check"]
    seen["seconds"] = round(time.time() - start, 1)
    gib = {"rss_at_check", "copy", "planned", "available", "peak", "growth"}
    print(json.dumps({k: round(v / 2**30, 3) if k in gib else v for k, v in seen.items()}))


if __name__ == "__main__":
    main()
