"""``python -m segbook.book run --profile P [--chapters ...]``: execute the book's chapters."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segbook.book",
                                     description="Execute segbook's chapters with papermill.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute chapters into results/<profile>/<chapter>/")
    run.add_argument("--profile", default="cpu", help="smoke, cpu or full (default: cpu)")
    run.add_argument("--chapters", nargs="*", default=None,
                     help="chapter stems, numbers or prefixes (default: all)")
    run.add_argument("--keep-going", action="store_true",
                     help="run the remaining chapters after one fails")
    run.add_argument("--timeout", type=int, default=None, help="seconds allowed per cell")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("list", help="list chapters and profiles")
    args = parser.parse_args(argv)

    from segbook.book.paths import chapter_paths
    from segbook.book.profiles import available_profiles

    if args.command == "list":
        print("chapters:", ", ".join(chapter_paths()))
        print("profiles:", ", ".join(available_profiles()))
        return 0

    from segbook.book.runner import check_profile, resolve_chapters, run_book

    try:
        check_profile(args.profile)
        resolve_chapters(args.chapters)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_book(args.profile, args.chapters, keep_going=args.keep_going,
                    progress=not args.no_progress, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
