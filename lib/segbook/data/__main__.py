"""``python -m segbook.data``: prepare, list and describe the evaluation datasets.

    python -m segbook.data list [--root DIR]
    python -m segbook.data info NAME
    python -m segbook.data prepare NAME [--root DIR] [--split S] [--curated-list FILE]
                                        [--archives DIR] [--quick] [--no-hash] [--allow-count-mismatch]

Exit status: 0 ready, 2 missing files (the message says what to fetch), 3 corrupt files,
1 other errors (unknown dataset, bad arguments).
"""

from __future__ import annotations

import argparse
import sys

from segbook.data.manifests import DATASETS, ManifestError, load_manifest
from segbook.data.root import DATA_ENV, data_root
from segbook.errors import CorruptFileError, MissingDatasetError

EXIT_MISSING, EXIT_CORRUPT, EXIT_OTHER = 2, 3, 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segbook.data",
                                description="Prepare and check the datasets the papers evaluate on.")
    sub = p.add_subparsers(dest="command", required=True)
    root_help = f"datasets root (default ${DATA_ENV}, else ~/segbook-data)"

    ls = sub.add_parser("list", help="each dataset, its folder and whether it is there")
    ls.add_argument("--root", help=root_help)

    info = sub.add_parser("info", help="a dataset's sources, licence, splits and preparation steps")
    info.add_argument("name", choices=DATASETS)

    prep = sub.add_parser("prepare", help="verify a fetched dataset and record its checksums")
    prep.add_argument("name", choices=DATASETS)
    prep.add_argument("--root", help=root_help)
    prep.add_argument("--split", help="split to check (default: the one the papers evaluate)")
    prep.add_argument("--curated-list", help="split list to install first (COCO-Stuff-27: IIC's "
                      "Coco164kFull_Stuff_Coarse_7.txt for val2017, 2175 ids)")
    prep.add_argument("--archives", help="folder with the downloaded archives, to check their checksums")
    prep.add_argument("--quick", action="store_true", help="only check that the files exist")
    prep.add_argument("--no-hash", action="store_true", help="skip the sha256 of every file")
    prep.add_argument("--allow-count-mismatch", action="store_true",
                      help="warn instead of failing when a split has another size than published")
    return p


def _list(root) -> int:
    base = data_root(root)
    print(f"datasets root: {base}")
    for name in DATASETS:
        m = load_manifest(name)
        spec = m.split()
        folder = base / m.directory
        stamp = folder / ".segbook" / f"{name}.{spec.name}.json"
        state = "prepared" if stamp.is_file() else ("present, not prepared" if folder.is_dir() else "missing")
        print(f"  {name:14s} {m.directory + '/':14s} split {spec.name:10s} {spec.count!s:>5s} images  {state}")
    return 0


def _info(name: str) -> int:
    m = load_manifest(name)
    print(m.instructions())
    print("Splits:")
    for split, spec in m.splits.items():
        print(f"  {split}: {spec.count} images ({spec.count_source}); labels {spec.label}")
    labels = m.data["labels"]
    print(f"Classes: {m.num_classes} (background: {m.background}); ignore value in label maps: -1")
    print("Encoding: " + " ".join(str(labels.get("encoding", "")).split()))
    print(f"Manifest: {m.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list(args.root)
        if args.command == "info":
            return _info(args.name)
        from segbook.data.prepare import prepare
        prepare(args.name, root=args.root, split=args.split, curated_list=args.curated_list,
                archives=args.archives, decode=not args.quick, hash_files=not (args.quick or args.no_hash),
                strict=not args.allow_count_mismatch)
        print(f"{args.name}: ready.")
        return 0
    except MissingDatasetError as exc:
        print(f"\nMISSING: {exc}", file=sys.stderr)
        return EXIT_MISSING
    except CorruptFileError as exc:
        print(f"\nCORRUPT: {exc}", file=sys.stderr)
        return EXIT_CORRUPT
    except (ManifestError, ValueError, FileNotFoundError) as exc:
        print(f"\nERROR: {exc}", file=sys.stderr)
        return EXIT_OTHER


if __name__ == "__main__":
    sys.exit(main())
