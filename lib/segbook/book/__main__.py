"""``python -m segbook.book``: execute, check and rehearse the book's chapters.

- ``run --profile P [--chapters ...] [--set key=value ...] [--limit N]``: execute chapters
  into ``results/<profile>/<chapter>/``;
- ``check [--profile cpu]``: are the committed results what the current code produces?
- ``rehearse [--chapters ...] [--limit N]``: the ``full`` profile on random weights of the
  real architectures and fake datasets (:mod:`segbook.book.rehearse`);
- ``html --profile P``: render the executed chapters of ``results/<P>/`` as a static HTML
  book in ``results/<P>/html/`` (:mod:`segbook.book.html`);
- ``list``: chapters and profiles.
"""

from __future__ import annotations

import argparse
import sys


def _overrides(args) -> dict:
    from segbook.book.profiles import parse_override

    out = dict(parse_override(text) for text in (args.set or []))
    if getattr(args, "limit", None) is not None:
        out["image_limit"] = args.limit
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segbook.book",
                                     description="Execute segbook's chapters with papermill.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute chapters into results/<profile>/<chapter>/")
    run.add_argument("--profile", default="cpu", help="smoke, cpu or full (default: cpu)")
    run.add_argument("--chapters", nargs="*", default=None,
                     help="chapter stems, numbers or prefixes (default: all)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a profile key for this run (dotted for nested keys, "
                          "e.g. --set photo_size=256 --set datasets.0.limit=5 "
                          "--set strict_datasets=false); recorded in provenance.json")
    run.add_argument("--limit", type=int, default=None, metavar="N",
                     help="only the first N images of each dataset (= --set image_limit=N)")
    run.add_argument("--device", default=None, help="the chapters' device parameter "
                     "(default: the chapter's own, 'auto')")
    run.add_argument("--keep-going", action="store_true",
                     help="run the remaining chapters after one fails")
    run.add_argument("--timeout", type=int, default=None, help="seconds allowed per cell")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    check = sub.add_parser("check", help="fail when committed results no longer match the "
                                         "code, chapter and profile that made them")
    check.add_argument("--profile", default="cpu")
    reh = sub.add_parser("rehearse", help="run the full profile on random weights of the real "
                                          "architectures and fake datasets (numbers meaningless)")
    reh.add_argument("--chapters", nargs="*", default=None)
    reh.add_argument("--limit", type=int, default=1, metavar="N",
                     help="images per dataset (default 1)")
    reh.add_argument("--device", default=None, help="cpu or cuda (default: the profile's)")
    reh.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a profile key as in 'run' (e.g. fewer optimisation "
                          "passes for a CPU rehearsal: --set recipe.passes=40)")
    reh.add_argument("--keep", default=None, metavar="DIR",
                     help="write the fake weights and data under DIR and keep them")
    reh.add_argument("--no-progress", action="store_true")
    html = sub.add_parser("html", help="render the executed chapters of results/<profile>/ as "
                                       "an HTML book in results/<profile>/html/")
    html.add_argument("--profile", default="cpu")
    html.add_argument("--out", default=None, metavar="DIR",
                      help="where to write the book (default: results/<profile>/html)")
    html.add_argument("--no-strict", action="store_true",
                      help="Sphinx warnings (unresolved citations, broken links, missing "
                           "images) do not fail the build")
    html.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="list chapters and profiles")
    args = parser.parse_args(argv)

    from segbook.book.paths import chapter_paths
    from segbook.book.profiles import available_profiles

    if args.command == "list":
        print("chapters:", ", ".join(chapter_paths()))
        print("profiles:", ", ".join(available_profiles()))
        return 0

    if args.command == "html":
        from pathlib import Path

        from segbook.book.html import HtmlBuildError, NoExecutedChapters, build_html

        try:
            build_html(args.profile, Path(args.out) if args.out else None,
                       strict=not args.no_strict, progress=not args.no_progress)
        except NoExecutedChapters as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except HtmlBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0

    if args.command == "check":
        from segbook.book.freshness import main_check

        return main_check(args.profile)

    from segbook.book.runner import check_overrides, check_profile, resolve_chapters, run_book

    if args.command == "rehearse":
        from segbook.book.profiles import parse_override
        from segbook.book.rehearse import rehearse

        try:
            stems = resolve_chapters(args.chapters)
            extra = dict(parse_override(text) for text in (args.set or []))
            check_overrides("full", stems, extra)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return rehearse(args.chapters, limit=args.limit, device=args.device,
                        workdir=args.keep, keep=args.keep is not None,
                        progress=not args.no_progress, overrides=extra)

    try:
        check_profile(args.profile)
        stems = resolve_chapters(args.chapters)
        overrides = _overrides(args)
        check_overrides(args.profile, stems, overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_book(args.profile, args.chapters, keep_going=args.keep_going,
                    progress=not args.no_progress, timeout=args.timeout,
                    overrides=overrides or None,
                    parameters={"device": args.device} if args.device else None)


if __name__ == "__main__":
    sys.exit(main())
