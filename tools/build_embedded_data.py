"""Builds the embedded CIFAR-10 subset shipped in `e2rnas_tf/assets/`.

Takes the first 200 training and 50 test images of every class (by sorted
file name) from the CIFAR-10 JPEG tarball and stores their ORIGINAL JPEG
bytes, unchanged, in an `.npz` without pickled objects:

    class_names     unicode [10]         sorted class folder names
    train_jpeg      uint8 [total bytes]  concatenated JPEG files
    train_offsets   int64 [N + 1]        file i is jpeg[offsets[i]:offsets[i+1]]
    train_labels    int32 [N]            index into class_names
    train_files     unicode [N]          member names in the tarball
    test_*          the same for the test split
    source_sha256   unicode []           sha256 of the tarball

The output is byte-for-byte reproducible (fixed zip timestamps and order).

Usage:

    python tools/build_embedded_data.py /work/shared/data/cifar10-jpeg.tar.gz
    # -> e2rnas_tf/assets/cifar10_subset.npz (about 1 MB)
"""

import argparse
import hashlib
import io
import os
import posixpath
import sys
import tarfile
import zipfile

import numpy as np

PER_CLASS = {"train": 200, "test": 50}
EXTENSIONS = (".jpg", ".jpeg")
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "e2rnas_tf", "assets", "cifar10_subset.npz")


def select_members(names, per_class):
    """Chooses the first `per_class[split]` JPEGs of each class by name.

    Args:
        names: Member names of the tarball (`<split>/<class>/<file>`, an
            optional leading `./` or top folder is allowed).
        per_class: Dict split -> number of files per class.

    Returns:
        `(class_names, chosen)`: the sorted class names of the train split
        and, per split, a list of `(member_name, label)` in class order.
    """
    by_split = {split: {} for split in per_class}
    for name in names:
        parts = [p for p in posixpath.normpath(name).split("/") if p != "."]
        if len(parts) < 3 or not parts[-1].lower().endswith(EXTENSIONS):
            continue
        split, cls = parts[-3], parts[-2]
        if split in by_split:
            by_split[split].setdefault(cls, []).append(name)
    class_names = sorted(by_split["train"])
    if not class_names:
        raise SystemExit("No train/<class>/*.jpg members found in the tarball")
    chosen = {}
    for split, count in per_class.items():
        if sorted(by_split[split]) != class_names:
            raise SystemExit(
                f"{split} classes {sorted(by_split[split])} differ from train "
                f"classes {class_names}")
        chosen[split] = []
        for label, cls in enumerate(class_names):
            files = sorted(by_split[split][cls],
                           key=lambda n: posixpath.basename(n))
            if len(files) < count:
                raise SystemExit(
                    f"{split}/{cls} has {len(files)} images, need {count}")
            chosen[split].extend((n, label) for n in files[:count])
    return class_names, chosen


def write_npz(path, arrays):
    """Writes arrays as a deterministic `.npz` (sorted, fixed timestamps)."""
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arrays[key]),
                                      allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0,
                                                            0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buffer.getvalue())
    os.replace(tmp, path)


def build(tar_path, output, per_class=None):
    """Reads the tarball and writes the subset.

    Args:
        tar_path: The CIFAR-10 JPEG `.tar.gz`.
        output: Output `.npz` path.
        per_class: Dict split -> images per class (default `PER_CLASS`).

    Returns:
        The dict of arrays written.
    """
    per_class = PER_CLASS if per_class is None else per_class
    with open(tar_path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    with tarfile.open(tar_path, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        class_names, chosen = select_members(list(members), per_class)
        arrays = {"class_names": np.array(class_names),
                  "source_sha256": np.array(sha256)}
        for split, items in chosen.items():
            blobs = [tar.extractfile(members[name]).read() for name, _ in items]
            sizes = np.array([len(b) for b in blobs], np.int64)
            arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
            arrays[f"{split}_offsets"] = np.concatenate(
                [[0], np.cumsum(sizes)]).astype(np.int64)
            arrays[f"{split}_labels"] = np.array([lab for _, lab in items],
                                                 np.int32)
            arrays[f"{split}_files"] = np.array([name for name, _ in items])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_npz(output, arrays)
    return arrays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tarball", help="path to cifar10-jpeg.tar.gz")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help="output .npz (default: %(default)s)")
    args = parser.parse_args(argv)
    arrays = build(args.tarball, args.output)
    print(f"wrote {args.output}: {os.path.getsize(args.output)} bytes, "
          f"{arrays['train_labels'].size} train + "
          f"{arrays['test_labels'].size} test images, classes "
          f"{', '.join(arrays['class_names'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
