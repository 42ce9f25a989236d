"""The QAT training text: MPL-2.0 and LGPL-2.1 (/usr/share/common-licenses) and the Markdown/reST documentation
shipped inside installed Python packages, never the evaluation texts (Artistic, BSD, GPL-2, LGPL-3).

Package documents are left out when their name says license/copying/notice/authors, or when they contain a
distinctive sentence of an evaluation text (so a README quoting the BSD clauses cannot leak evaluation text into
training). Files are taken in sorted path order until ``--max-mb``. Run:
``python bench/qat_corpus.py -o corpus.txt [--max-mb 16]``; prints the byte count and the sources.
"""

from __future__ import annotations

import argparse
import site
import sys
import sysconfig
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
TRAIN_LICENSES = ("MPL-2.0", "LGPL-2.1")
EVAL_LICENSES = ("Artistic", "BSD", "GPL-2", "LGPL-3")
#: phrases that mark evaluation text (checked case-insensitively, whitespace collapsed)
EVAL_MARKERS = ("redistribution and use in source and binary forms", "gnu general public license",
                "gnu lesser general public license", "artistic license", "the copyright holder")
_SKIP_NAMES = ("license", "licence", "copying", "notice", "authors")


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def package_documents() -> list[Path]:
    """Every ``*.md`` / ``*.rst`` under the site-packages folders, sorted."""
    roots = {Path(p) for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()}
    found = {p for root in roots for pattern in ("*.md", "*.rst") for p in root.rglob(pattern) if p.is_file()}
    return sorted(found)


def build(max_bytes: int) -> tuple[str, dict[str, int]]:
    """(the corpus text, bytes per source kind)."""
    parts = [(LICENSES / name).read_text(encoding="utf-8") for name in TRAIN_LICENSES]
    sources = {"licenses": sum(len(p) for p in parts), "documents": 0, "skipped": 0}
    total = sources["licenses"]
    for path in package_documents():
        if total >= max_bytes:
            break
        if any(word in path.name.lower() for word in _SKIP_NAMES):
            sources["skipped"] += 1
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        flat = _normal(text)
        if any(marker in flat for marker in EVAL_MARKERS):
            sources["skipped"] += 1
            continue
        parts.append(text)
        sources["documents"] += 1
        total += len(text)
    return "\n\n".join(parts)[:max_bytes], sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--max-mb", type=float, default=16.0)
    args = parser.parse_args(argv)
    text, sources = build(int(args.max_mb * (1 << 20)))
    evaluation = [_normal((LICENSES / name).read_text(encoding="utf-8"))[200:400] for name in EVAL_LICENSES]
    flat = _normal(text)
    leaked = [name for name, probe in zip(EVAL_LICENSES, evaluation, strict=True) if probe in flat]
    if leaked:
        print(f"evaluation text found in the corpus: {', '.join(leaked)}", file=sys.stderr)
        return 1
    args.output.write_text(text, encoding="utf-8")
    print(f"{args.output}: {len(text.encode()):,} bytes ({sources})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
