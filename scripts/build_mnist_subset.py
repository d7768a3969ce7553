"""Build the MNIST subset the project ships (run once, by a maintainer).

Reads the original idx files in ../shared/data/mnist (checking their SHA-256
sums), keeps the first 1024 training images and labels in file order, and
writes them, still in idx format and gzip-compressed, to data/:

    python scripts/build_mnist_subset.py [--source DIR] [--count 1024]
"""
import argparse
import gzip
import hashlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import runner  # noqa: E402  (the idx reader and writer)

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"images": "train-images-idx3-ubyte.gz", "labels": "train-labels-idx1-ubyte.gz"}


def check_sums(source):
    sums = {}
    with open(os.path.join(source, "SHA256SUMS")) as f:
        for line in f:
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    for name in FILES.values():
        with open(os.path.join(source, name), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sums[name]:
                sys.exit(f"{name}: SHA-256 mismatch; the source file is corrupt")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.join(HERE, "..", "..", "shared", "data", "mnist"))
    parser.add_argument("--count", type=int, default=1024)
    args = parser.parse_args()
    check_sums(args.source)
    for kind, name in FILES.items():
        array = runner.read_idx(os.path.join(args.source, name))[:args.count]
        out = os.path.join(runner.DATA_DIR, runner.SUBSET_FILES[kind])
        with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(runner.idx_bytes(array))
        print(f"wrote {out}: {array.shape}, {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
