"""A package as it was at an older git revision, importable beside the working tree's.

The lab's A/B benchmarks (lab.hotpath, lab.detector_ab) time old and new code in one process,
interleaved, so the noise of a shared machine hits both sides alike. :func:`load_legacy` writes
the package's files at ``ref`` (``git show``) into a temporary directory under a private name,
with the package's imports of itself pointed at that name, and imports it.
"""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _git(repo: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise SystemExit(f"git {' '.join(args)} failed in {repo}: {detail}".strip())


def load_legacy(ref: str, repo: Path, package: str, alias: str,
                modules: tuple[str, ...] | None = None):
    """The package ``package`` (dotted, e.g. "monitor" or "service.defences") as it was at
    ``ref`` in ``repo``, imported as ``alias``. ``modules``: its module names to take (default:
    every .py file of the package at ``ref``). The package's from-imports of itself
    ("from pkg.mod import x", "from pkg import mod") are renamed (a plain "import pkg.mod" is
    refused); everything else it imports (numpy, common, ...) is the working tree's."""
    path = package.replace(".", "/")
    if modules is None:
        names = _git(repo, "ls-tree", "--name-only", f"{ref}:{path}").split()
        modules = tuple(n[:-3] for n in names if n.endswith(".py"))
    root = Path(tempfile.mkdtemp(prefix="mg-legacy-"))
    pkg = root / alias
    pkg.mkdir()
    own = re.compile(rf"^(\s*)from\s+{re.escape(package)}(?=[\s.])", re.M)
    plain = re.compile(rf"^\s*import\s+{re.escape(package)}\b", re.M)
    for name in modules:
        src = _git(repo, "show", f"{ref}:{path}/{name}.py")
        if plain.search(src):
            # "import pkg.mod" binds the name pkg, which would still be the current package
            raise SystemExit(f"{path}/{name}.py at {ref} imports {package} with a plain "
                             f"import: only from-imports of the package can be renamed")
        (pkg / f"{name}.py").write_text(own.sub(rf"\1from {alias}", src))
    if not (pkg / "__init__.py").exists():
        (pkg / "__init__.py").write_text("")
    for name in [m for m in sys.modules if m == alias or m.startswith(alias + ".")]:
        del sys.modules[name]           # loaded before (from another ref): load this one
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    return importlib.import_module(alias)
