"""`cclnb report {index,tables,migrate}`: the pages built from committed study records.

- `index`: `reports/index.html`, the gallery of every study (`cclnb.study.gallery`);
- `tables`: the results between `<!-- cclnb:... -->` markers in README.md and docs/*.md
  (`cclnb.study.tables`); `--check` only says which pages are stale (exit 1), as the tests do;
- `migrate`: records with absolute paths rewritten relative to their run root
  (`cclnb.study.records.migrate_records`); running it again changes nothing.

None of them trains or evaluates; `cclnb study --report-only` renders one study's own page.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    index = actions.add_parser("index", help="write reports/index.html, one row per study",
                               description="write <reports-root>/index.html, one row per study")
    tables = actions.add_parser("tables", help="rewrite the results tables of README.md and docs/*.md",
                                description="rewrite what lies between <!-- cclnb:KIND ARGS --> and "
                                            "<!-- /cclnb --> from the records")
    tables.add_argument("pages", nargs="*", default=None, metavar="PAGE",
                        help="Markdown pages (default: README.md and docs/*.md that hold markers)")
    tables.add_argument("--check", action="store_true",
                        help="write nothing; list the stale pages and exit 1 if there are any")
    migrate = actions.add_parser("migrate", help="rewrite records' absolute paths relative to the run root",
                                 description="rewrite records' absolute paths relative to the run root")
    migrate.add_argument("folders", nargs="*", default=None, metavar="FOLDER",
                         help="records folders (default: every <reports-root>/*/runs)")
    for action in (index, tables, migrate):
        action.add_argument("--reports-root", default="reports", help="the study reports (default reports)")


def run(args: argparse.Namespace) -> int:
    from cclnb.study import gallery, records, tables

    root = Path(args.reports_root)
    if args.action == "index":
        print(f"wrote {gallery.write_index(root)}")
        return 0
    if args.action == "tables":
        pages = [Path(p) for p in args.pages] if args.pages else tables.pages(".")
        if args.check:
            old = tables.stale(pages, root)
            for page in old:
                print(f"stale: {page} (run `cclnb report tables` to rewrite it from the records)")
            return 1 if old else 0
        changed = tables.write(pages, root)
        print(f"rewrote {len(changed)} of {len(pages)} pages" + "".join(f"\n  {p}" for p in changed))
        return 0
    folders = args.folders or sorted(str(d / records.RECORDS_FOLDER) for d in root.iterdir() if d.is_dir())
    rewritten = records.migrate_records(folders)
    print(f"migrated {len(rewritten)} records" + "".join(f"\n  {p}" for p in rewritten))
    return 0
