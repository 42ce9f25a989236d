"""The QLoRA domain data (issue 15): the Markdown/reST documentation of installed Python packages, split BY PACKAGE
into training packages and held-out evaluation packages.

A document belongs to the top-level folder it sits in under site-packages (``numpy/ma/README.rst`` -> ``numpy``;
``numpy-2.4.6.dist-info/...`` -> ``numpy`` too), or to its first ``level`` folders with ``--split-level``. A package
is held out when the SHA-256 of its name, taken mod 3, is 0 (about a third of the packages, fixed by the names
alone), except that a package holding more than a quarter of all document bytes always trains (training needs the
bytes, and an evaluation set that is one package measures that package only). The documents are filtered as
``qat_corpus.py`` filters its training text (no file named license/copying/notice/authors, nothing under a
``licenses`` folder, nothing quoting the general evaluation texts Artistic/BSD/GPL-2/LGPL-3), and an evaluation
document whose whitespace-normalized text also occurs in training is dropped (vendored copies).

``prepare(folder)`` writes ``train.txt``, ``eval.txt`` and ``split.json`` into ``folder`` once and reads them back
afterwards, so the corpus built on one machine can be carried to another (its installed packages may differ).
"""

from __future__ import annotations

import collections
import hashlib
import json
import site
import sysconfig
from pathlib import Path
from typing import Any

from qat_corpus import _SKIP_NAMES, EVAL_LICENSES, EVAL_MARKERS, LICENSES, _normal, package_documents

DOMINANT_SHARE = 0.25
_META_SUFFIXES = (".dist-info", ".egg-info", ".data")


def _roots() -> list[Path]:
    found = {Path(p) for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)  # the deepest root names a file first


def package_of(path: Path, roots: list[Path], level: int = 1) -> str | None:
    """The split unit of a document (see the module docstring); ``None`` for a file directly in site-packages."""
    for root in roots:
        try:
            parts = path.relative_to(root).parts
        except ValueError:
            continue
        if len(parts) < 2:
            return None
        top = parts[0]
        for suffix in _META_SUFFIXES:
            if top.endswith(suffix):
                top = top[:-len(suffix)].split("-")[0]
        return "/".join([top.lower().replace("-", "_"), *parts[1:min(level, len(parts) - 1)]])
    return None


def held_out(name: str) -> bool:
    """Whether a package's documents are evaluation text (by its name alone)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 3 == 0


def _usable(path: Path) -> str | None:
    """The document's text, or None when it is left out (see the module docstring)."""
    if any(word in path.name.lower() for word in _SKIP_NAMES):
        return None
    if any(part.lower() in ("licenses", "license", "licences") for part in path.parts[:-1]):
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    flat = _normal(text)
    if not flat or any(marker in flat for marker in EVAL_MARKERS):
        return None
    return text


def build(max_train_bytes: int, max_eval_bytes: int, level: int = 1) -> tuple[str, str, dict[str, Any]]:
    """(training text, evaluation text, the split's description)."""
    roots = _roots()
    documents: dict[str, list[tuple[Path, str]]] = collections.defaultdict(list)
    skipped = 0
    for path in package_documents():
        name = package_of(path, roots, level)
        text = _usable(path) if name is not None else None
        if text is None:
            skipped += 1
            continue
        documents[name].append((path, text))
    sizes = {name: sum(len(t) for _, t in docs) for name, docs in documents.items()}
    total = sum(sizes.values()) or 1
    evaluation = sorted(n for n in documents if held_out(n) and sizes[n] <= DOMINANT_SHARE * total)
    training = sorted(n for n in documents if n not in evaluation)
    if not training or not evaluation:
        raise SystemExit(f"package split: {len(training)} training and {len(evaluation)} evaluation packages; "
                         "both must be non-empty (install more packages with documentation or pass --data)")
    train_parts, seen, used = [], set(), collections.Counter()
    size = 0
    for name in training:
        for _, text in documents[name]:
            digest = hashlib.sha256(_normal(text).encode()).digest()
            if digest in seen or size >= max_train_bytes:
                continue
            seen.add(digest)
            train_parts.append(text)
            used[name] += len(text)
            size += len(text)
    eval_parts, duplicates, eval_used = [], 0, collections.Counter()
    size = 0
    for name in evaluation:
        for _, text in documents[name]:
            digest = hashlib.sha256(_normal(text).encode()).digest()
            if digest in seen:
                duplicates += 1
                continue
            if size >= max_eval_bytes:
                continue
            seen.add(digest)
            eval_parts.append(text)
            eval_used[name] += len(text)
            size += len(text)
    info = {"split_level": level, "rule": "sha256(package) % 3 == 0 -> evaluation, unless > 25% of the bytes",
            "train_packages": dict(sorted(used.items())), "eval_packages": dict(sorted(eval_used.items())),
            "skipped_documents": skipped, "eval_duplicates_dropped": duplicates}
    train_text, eval_text = "\n\n".join(train_parts), "\n\n".join(eval_parts)
    _check_no_license_text(train_text + eval_text)
    return train_text, eval_text, info


def _check_no_license_text(text: str) -> None:
    flat = _normal(text)
    for name in EVAL_LICENSES:
        if _normal((LICENSES / name).read_text(encoding="utf-8"))[200:400] in flat:
            raise SystemExit(f"general evaluation text {name} found in the domain corpus")


def prepare(folder: Path, max_train_bytes: int, max_eval_bytes: int, level: int = 1) -> tuple[str, str, dict]:
    """Read the corpus from ``folder``, building and writing it first when it is not there."""
    files = [folder / n for n in ("train.txt", "eval.txt", "split.json")]
    if not all(f.is_file() for f in files):
        train_text, eval_text, info = build(max_train_bytes, max_eval_bytes, level)
        folder.mkdir(parents=True, exist_ok=True)
        files[0].write_text(train_text, encoding="utf-8")
        files[1].write_text(eval_text, encoding="utf-8")
        files[2].write_text(json.dumps(info, indent=2))
    return (files[0].read_text(encoding="utf-8"), files[1].read_text(encoding="utf-8"),
            json.loads(files[2].read_text()))
