"""The ``sirl`` console script: when a module of the ``[train]`` extra is missing it says so in one line, with the
pip command that installs what is missing, instead of a ModuleNotFoundError; then it runs :func:`sirl.cli.main`.

``pip install`` of sirl-kernels alone brings the kernels (torch, numpy); the trainer's commands need ``[train]``.
``sirl``, ``sirl --help`` and ``sirl COMMAND --help`` work without it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata

# The import name of each distribution of [train] in pyproject.toml (tests/packaging checks the two agree).
TRAIN_MODULES = {
    "pyyaml": "yaml",
    "transformers": "transformers",
    "peft": "peft",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "scipy": "scipy",
    "gguf": "gguf",
}


def train_requirements() -> dict[str, str]:
    """Distribution name -> requirement of the installed package's [train] extra (as in its metadata)."""
    try:
        declared = metadata.requires("sirl-kernels") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        declared = []
    found = {}
    for line in declared:
        requirement, _, marker = line.partition(";")
        if re.search(r"extra\s*==\s*['\"]train['\"]", marker):
            found[re.split(r"[\s<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower()] = requirement.strip()
    return found


def missing_train_requirements() -> list[str]:
    """The requirements of [train] whose module cannot be found (nothing is imported)."""
    declared = train_requirements()
    return [declared.get(dist, dist) for dist, module in TRAIN_MODULES.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    wants_help = not args or any(a in ("-h", "--help") for a in args)
    missing = [] if wants_help else missing_train_requirements()
    if missing:
        command = " ".join(f"'{r}'" if any(c in r for c in "<>=!~") else r for r in missing)
        print(f"sirl: the trainer needs sirl-kernels' [train] extra, not installed here: pip install {command}",
              file=sys.stderr)
        return 2
    from sirl.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
