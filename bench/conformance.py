"""Run the ONNX backend conformance suite through the compiler and write a markdown report.

Usage::

    python bench/conformance.py [--jobs 2] [--timeout 60] [--filter REGEX] [--kinds node,simple,...]
                                [--recipe float] [--out bench/out/conformance.md]

Every case is run in ONNX Runtime as it is, compiled (``--recipe``, default ``float``) in a worker process with a
per-case time limit, and run again; see ``bench/_conformance.py`` (the harness) for the categories. The report (counts per
kind and category, the bugs grouped by error, refusals, ORT problems, wall time, versions) is printed and written
to ``--out``; every case's result goes to the same path with ``.json``. Exit status: 0 when no case is a bug
(``changed``, ``crash``, ``timeout``), 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conformance import (  # noqa: E402 - the sibling module of a script
    BUG_CATEGORIES,
    CATEGORIES,
    KINDS,
    CaseResult,
    discover_cases,
    run_cases,
)

__all__ = ["main", "format_report"]


def versions() -> dict[str, str]:
    """The versions that decide the outcome: Python, onnx, onnxruntime, onnx-ir, onnxscript, numpy, qcompiler."""
    import importlib.metadata
    import platform

    found = {"python": platform.python_version()}
    for dist in ("qcompiler", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "absent"
    return found


def _signature(result: CaseResult) -> str:
    """The detail with names, numbers and shapes blanked, so that one bug seen in many cases groups together."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", result.detail)
    text = re.sub(r"\(\d[^)]*\)|\[\d[^\]]*\]", "(…)", text)
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", text)


def group_results(results: Iterable[CaseResult], categories: Iterable[str]) -> list[tuple[str, str, list[CaseResult]]]:
    """(category, signature, cases) for the results in ``categories``, biggest groups first."""
    wanted = set(categories)
    groups: dict[tuple[str, str], list[CaseResult]] = collections.defaultdict(list)
    for result in results:
        if result.category in wanted:
            groups[(result.category, f"[{result.stage}] {_signature(result)}")].append(result)
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(((c, s, r) for (c, s), r in groups.items()), key=lambda g: (order[g[0]], -len(g[2]), g[1]))


def format_report(results: Sequence[CaseResult], *, wall_seconds: float, settings: dict[str, Any],
                  max_examples: int = 12) -> str:
    """A markdown report: counts per kind and category, the bugs grouped by error, refusals, ORT problems."""
    by_id_kind = {r.id: r.id.split("/", 1)[0] for r in results}
    kinds = [k for k in KINDS if k in by_id_kind.values()]
    counts = collections.Counter((by_id_kind[r.id], r.category) for r in results)
    lines = ["# ONNX backend conformance through qcompiler", ""]
    lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    slowest = ", ".join(f"{r.id} {r.seconds:.1f} s" for r in sorted(results, key=lambda r: -r.seconds)[:3])
    lines.append(f"Wall time: {wall_seconds:.1f} s for {len(results)} cases (slowest: {slowest})")
    lines += ["", "## Counts", "", "| kind | " + " | ".join(CATEGORIES) + " | total |",
              "|---" * (len(CATEGORIES) + 2) + "|"]
    for kind in [*kinds, "all"]:
        row = [sum(counts[(k, c)] for k in (kinds if kind == "all" else [kind])) for c in CATEGORIES]
        lines.append(f"| {kind} | " + " | ".join(str(n) for n in row) + f" | {sum(row)} |")
    bugs = [r for r in results if r.category in BUG_CATEGORIES]
    lines += ["", f"## Bugs ({len(bugs)} cases: changed, crash, timeout)", ""]
    if not bugs:
        lines.append("None.")
    for category, signature, members in group_results(results, BUG_CATEGORIES):
        examples = ", ".join(m.id for m in members[:max_examples]) + (" …" if len(members) > max_examples else "")
        lines.append(f"- **{category}** ×{len(members)} `{signature}`")
        lines.append(f"  - first: `{members[0].id}`: {members[0].detail}")
        lines.append(f"  - cases: {examples}")
    suspects = [r for r in results if r.category == "ort-wrong-on-original" and r.note.startswith("compiled differs")]
    if suspects:
        lines += ["", "## Suspect (ORT wrong on the original, and the compiled model differs from the original)", ""]
        lines += [f"- `{r.id}`: {r.note}" for r in suspects]
    for title, wanted in (("Refused (UnsupportedModelError)", ("refused",)),
                          ("ONNX Runtime problems on the original", ("ort-cannot-run-original",
                                                                     "ort-wrong-on-original")),
                          ("Not checked (the harness cannot feed or compare the data)", ("not-checked",))):
        groups = group_results(results, wanted)
        if not groups:
            continue
        lines += ["", f"## {title}", ""]
        for category, signature, members in groups:
            examples = ", ".join(m.id.split("/", 1)[1] for m in members[:6]) + (" …" if len(members) > 6 else "")
            lines.append(f"- {category} ×{len(members)} `{signature[:200]}` ({examples})")
    return "\n".join(lines) + "\n"




def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case (default 60)")
    parser.add_argument("--filter", default=None, help="regex on case ids such as 'node/test_conv_.*'")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated (default {','.join(KINDS)})")
    parser.add_argument("--recipe", default="float", help="recipe name or TOML path (default float)")
    parser.add_argument("--out", default="bench/out/conformance.md", help="markdown report path")
    parser.add_argument("--verbose", action="store_true", help="print every case as it finishes")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.jobs < 1 or args.timeout <= 0 or not kinds or set(kinds) - set(KINDS):
        parser.error(f"--jobs >= 1, --timeout > 0, --kinds among {','.join(KINDS)}")
    args.kinds = kinds
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    start = time.perf_counter()
    cases = discover_cases(args.kinds, args.filter)
    if not cases:
        print(f"no case matches --filter {args.filter!r}", file=sys.stderr)
        return 2

    def progress(result: CaseResult, done: int, total: int) -> None:
        if args.verbose or result.category in BUG_CATEGORIES:
            print(f"[{done}/{total}] {result.category:<24} {result.id} {result.detail[:160]}", file=sys.stderr)
        elif done % 100 == 0:
            print(f"[{done}/{total}] {time.perf_counter() - start:.0f} s", file=sys.stderr)

    results = run_cases(cases, jobs=args.jobs, timeout=args.timeout, recipe=args.recipe, on_result=progress)
    wall = time.perf_counter() - start
    settings = {"recipe": args.recipe, "jobs": args.jobs, "timeout": f"{args.timeout:g} s",
                "filter": args.filter or "none", "kinds": ",".join(args.kinds)}
    report = format_report(results, wall_seconds=wall, settings=settings)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps([r.to_dict() for r in results], indent=1), encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 1 if any(r.category in BUG_CATEGORIES for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
