"""Per-module mutation scores from the results of ``mutmut run`` (see docs/testing.md).

Reads the verdicts mutmut keeps under ``mutants/`` and the equivalent mutants listed in
docs/testing.md, and prints, per module, the mutants killed out of those that are not
equivalent. An equivalent mutant is listed by its function and its mutated code (not by its
number, which changes whenever the function does), so a surviving mutant counts as equivalent
only while its change is still the one the list describes.

    python tools/mutation_score.py [--survivors] [--only FILE] [module ...]

``--survivors`` lists every mutant that survived and is not listed, with its change
(``mutmut show NAME`` prints the whole diff). ``--only FILE`` counts only the mutants named in
FILE (one a line): the score of a sample, e.g. the first names of a seeded shuffle. Run from
the repository root, after ``mutmut run``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "clipped_optim"
DOC = ROOT / "docs" / "testing.md"
# a row of the equivalents table: | `module.function` | `mutated code` | why |
ROW = re.compile(r"^\|\s*`([\w.]+)`\s*\|\s*`(.+?)`\s*\|")

# mutmut's exit codes (mutmut.stats.status_by_exit_code)
KILLED = {1, 3}
TIMEOUT = {24, -24, 152, 255, 36}  # killed by the CPU-time limit: counted as killed, as mutmut does
SURVIVED = {0}
NO_TESTS = {5, 33}
CRASHED = {-11}  # SIGSEGV: the tests died of the change (a mutated ctypes call), so it was noticed


def _squash(code: str) -> str:
    return " ".join(code.split())


def equivalents() -> set[tuple[str, str]]:
    """``(module.function, mutated code)`` of every mutant docs/testing.md lists as equivalent."""
    rows = set()
    for line in DOC.read_text(encoding="utf-8").splitlines() if DOC.exists() else []:
        m = ROW.match(line)
        if m:
            rows.add((m.group(1), _squash(m.group(2).replace("\\|", "|"))))
    return rows


def function_of(mutant: str) -> str:
    """``module.function`` (``module.Class.method``) of a mutant's name."""
    _, module, rest = mutant.split(".", 2)
    name = rest.partition("__mutmut_")[0]
    name = name[2:] if name.startswith("x_") else name.strip("xǁ").replace("ǁ", ".")
    return f"{module}.{name}"


def change_of(mutant: str, module: str) -> str:
    """The mutated code: the diff's added lines, squashed onto one line."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(mutant, path=Path(PACKAGE) / f"{module}.py")
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return _squash(" ".join(added))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "modules", nargs="*", help=f"module names, e.g. norms (default: every {PACKAGE} module mutmut ran)"
    )
    parser.add_argument(
        "--survivors", action="store_true", help="list the surviving mutants that are not listed as equivalent"
    )
    parser.add_argument("--only", metavar="FILE", help="count only the mutants named in FILE (one a line): a sample")
    args = parser.parse_args(argv)
    only = set(Path(args.only).read_text(encoding="utf-8").split()) if args.only else None
    meta = ROOT / "mutants" / PACKAGE
    modules = args.modules or sorted(p.name.removesuffix(".py.meta") for p in meta.glob("*.py.meta"))
    if not modules:
        print("no results: run `mutmut run` first (see docs/testing.md)")
        return 1
    listed = equivalents()
    print(
        f"{'module':<11} {'killed':>6} {'of':>5} {'score':>7}  {'survived':>8}  {'no tests':>8}  {'equivalent':>10}  {'not run':>7}"
    )
    survivors: list[str] = []
    for module in modules:
        path = meta / f"{module}.py.meta"
        verdicts = json.loads(path.read_text(encoding="utf-8"))["exit_code_by_key"] if path.exists() else {}
        if only is not None:
            verdicts = {name: code for name, code in verdicts.items() if name in only}
        counts: Counter[str] = Counter()
        for name, code in sorted(
            verdicts.items(), key=lambda kv: (kv[0].partition("__mutmut_")[0], int(kv[0].rpartition("_")[2]))
        ):
            if code is None:
                counts["not run"] += 1
            elif code in KILLED or code in TIMEOUT or code in CRASHED:
                counts["killed"] += 1
            else:  # survived, no tests, suspicious: not killed, unless equivalent
                change = change_of(name, module)
                if (function_of(name), change) in listed:
                    counts["equivalent"] += 1
                    continue
                counts["no tests" if code in NO_TESTS else "survived"] += 1
                survivors.append(f"{name}  [{function_of(name)}]  {change}")
        judged = counts["killed"] + counts["survived"] + counts["no tests"]
        score = f"{100 * counts['killed'] / judged:6.1f}%" if judged else "      -"
        print(
            f"{module:<11} {counts['killed']:>6} {judged:>5} {score}  {counts['survived']:>8}  {counts['no tests']:>8}"
            f"  {counts['equivalent']:>10}  {counts['not run']:>7}"
        )
    if args.survivors and survivors:
        print()
        print("\n".join(survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
