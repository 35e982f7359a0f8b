"""Templates from OCI images, as ratios against baselines measured in the same run.

    .venv/bin/python bench/oci_bench.py [--backend namespace|vm] [--runs N]

Starts a private docker-registry on 127.0.0.1, pushes a busybox image and a derived
image (busybox + one more layer), then measures:
  first build from an image (pull + unpack + agent runtime)
  second build sharing the base layer       vs the first build
  create -> first result, OCI template      vs the same for the catalogue template
                                              (python-3.13), interleaved, median of N
Everything it made (templates, blobs, registry, buildah storage) is removed after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "templates"))

import mvm
from mvm.templates import ensure_template, oci, remove_template
from oci_registry import Buildah, Registry, busybox_root, scratch_dir


def first_result(template: str, backend: str) -> float:
    start = time.perf_counter()
    with mvm.Sandbox.create(template, backend=backend, ttl="5m") as sb:
        sb.commands.run(["sh", "-c", "true"])
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="namespace", choices=["namespace", "vm"])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    ensure_template("python-3.13")
    made: list[str] = []
    with scratch_dir("mvm-oci-bench-") as work:
        (work / "registry").mkdir()
        registry = Registry(work / "registry")
        buildah = Buildah(work / "buildah")
        try:
            base = f"{registry.address}/bench/busybox:1"
            buildah.push(buildah.image_from_dir(busybox_root(work / "root"), "bb"), base)
            extra = work / "extra" / "opt"
            extra.mkdir(parents=True)
            (extra / "payload.bin").write_bytes(os.urandom(4 << 20))  # incompressible: the new layer is ~4 MiB
            derived = f"{registry.address}/bench/derived:1"
            buildah.push(buildah.image_from_dir(work / "extra", "derived", base=base), derived)

            t0 = time.perf_counter()
            first = oci.build_from_image(base, progress=lambda _: None)
            first_s = time.perf_counter() - t0
            made.append(first.name)
            before = oci.layout_usage()
            t0 = time.perf_counter()
            second = oci.build_from_image(derived, progress=lambda _: None)
            second_s = time.perf_counter() - t0
            made.append(second.name)
            after = oci.layout_usage()

            oci_times, catalogue_times = [], []
            for _ in range(args.runs):
                oci_times.append(first_result(first.name, args.backend))
                catalogue_times.append(first_result("python-3.13", args.backend))
            o, c = statistics.median(oci_times), statistics.median(catalogue_times)
            print(f"first build from an image        {first_s:7.2f} s")
            print(f"second build sharing layers      {second_s:7.2f} s  ({second_s / first_s:.2f}x the first; "
                  f"layout grew by {after['blobs'] - before['blobs']} blobs, "
                  f"{(after['bytes'] - before['bytes']) / 2**20:.1f} MiB)")
            print(f"create -> first result ({args.backend}, median of {args.runs})")
            print(f"  OCI template (busybox)         {o * 1000:7.0f} ms")
            print(f"  catalogue python-3.13          {c * 1000:7.0f} ms  (OCI/catalogue = {o / c:.2f}x)")
        finally:
            registry.stop()  # first: a failing cleanup below must not leave it running
            for name in made:
                remove_template(name, force=True)
            oci.collect_garbage()


if __name__ == "__main__":
    main()
