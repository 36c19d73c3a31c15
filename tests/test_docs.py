"""The README and the pages under docs/ are not stale: their commands, paths, links and config keys exist.

Every shell command in a fenced ``bash`` block of ``README.md`` and ``docs/*.md`` is split as a shell would split
it, and each ``python SCRIPT ...`` / ``.venv/bin/python -m MODULE ...`` is parsed by that command line's own
argument parser (``build_parser()``; the benchmarks' ``parse_args``) without running it. Its ``--config`` file
must exist and its ``--set`` overrides must load (:func:`kelvin.config_loading.load_config` names an unknown key and its
closest match). Paths into the repository, in commands and in inline code, must exist; relative links must
resolve, anchors included; every ``import`` of a Kelvin module in a ``python`` block must find its names. The
README stays at most 150 lines, links every docs/ page, and its test command is the one ``.ci/run`` runs.
Nothing here loads a model or runs a job.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150

REPO_DIRS = {".ci", "anomaly", "benchmarks", "configs", "docs", "envs", "kelvin", "policies", "samplers", "scripts",
             "tests"}
"""Top-level folders of the repository: a path that starts with one of them must exist (``runs/...`` is output)."""
PACKAGES = {"anomaly", "envs", "kelvin", "policies", "samplers"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
EXTERNAL_MODULES = {"pip", "pytest"}  # `python -m` modules that are not Kelvin's: their arguments are theirs
SHELL_LANGUAGES = {"bash", "sh", "shell"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(page: Path) -> list[tuple[str, int, str]]:
    """(language, line number of the block's first line, text) of every fenced block of ``page``."""
    text = page.read_text()
    return [(m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)]


def _prose(page: Path) -> str:
    """``page`` without its fenced blocks."""
    return FENCE.sub("", page.read_text())


def logical_lines(block: str, first_line: int = 1) -> list[tuple[int, str]]:
    """(line number, text) of each command line of a shell block: a backslash-newline continues a line, a newline
    inside quotes does not end one, and a ``#`` that starts a word starts a comment."""
    out: list[tuple[int, str]] = []
    current: list[str] = []
    quote = None
    line = start = first_line
    i = 0
    while i < len(block):
        c = block[i]
        if quote:
            current.append(c)
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"' and i + 1 < len(block):
                current.append(block[i + 1])
                i += 1
            line += c == "\n"
        elif c == "\\" and block[i + 1:i + 2] == "\n":
            current.append(" ")
            line += 1
            i += 1
        elif c in "'\"":
            quote = c
            current.append(c)
        elif c == "#" and (not current or current[-1].isspace()):
            end = block.find("\n", i)
            i = len(block) if end < 0 else end
            continue
        elif c == "\n":
            out.append((start, "".join(current)))
            current = []
            line += 1
            start = line
        else:
            current.append(c)
        i += 1
    out.append((start, "".join(current)))
    return [(n, text.strip()) for n, text in out if text.strip()]


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a command line (split at ``&&``, ``||``, ``;``, ``|``), without leading
    ``NAME=value`` environment assignments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    out = []
    for argv in commands:
        while argv and ENV_ASSIGNMENT.match(argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def _commands() -> list[tuple[str, list[str]]]:
    """("page:line", argv) of every shell command in a fenced shell block of the README and docs/."""
    found = []
    for page in PAGES:
        for language, first, block in _blocks(page):
            if language in SHELL_LANGUAGES:
                for number, line in logical_lines(block, first):
                    found += [(f"{_rel(page)}:{number}", argv) for argv in split_commands(line)]
    return found


COMMANDS = _commands()
PYTHON_COMMANDS = [(where, argv) for where, argv in COMMANDS if Path(argv[0]).name in PYTHONS or argv[0] in PYTHONS]


def _parser_owner(argv: list[str]):
    """The module that holds the parser of a ``python`` command, or None for a module that is not Kelvin's."""
    if argv[1] == "-m":
        name = argv[2]
        if name.split(".")[0] in EXTERNAL_MODULES:
            return None
        assert name.split(".")[0] in PACKAGES, f"python -m {name}: not a Kelvin module ({', '.join(sorted(PACKAGES))})"
        return importlib.import_module(name)
    script = ROOT / argv[1]
    assert script.is_file(), f"{argv[1]} does not exist"
    thin = re.search(r"run_main\(\"([\w.]+)\"\)", script.read_text())  # train.py, evaluate.py: kelvin.cli.run_main
    if thin:
        module = importlib.import_module(thin.group(1))
        return importlib.import_module(module.main.__module__)  # kelvin.evaluation re-exports cli.main
    spec = importlib.util.spec_from_file_location(f"_docs_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))  # as `python SCRIPT` has it (the benchmarks import their _common)
    try:
        spec.loader.exec_module(module)  # its job sits behind `if __name__ == "__main__"`
    finally:
        sys.path.remove(str(script.parent))
    return module


def _parse(owner, args: list[str], command: str, where: str):
    """The namespace ``owner``'s parser makes of ``args``; a flag it does not take fails the test."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if hasattr(owner, "build_parser"):
                return owner.build_parser().parse_args(args)
            assert hasattr(owner, "parse_args"), f"{owner.__name__} has no build_parser() to check `{command}` with"
            return owner.parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `{command}`: its parser refuses the arguments: {stderr.getvalue().strip()}")


def _repo_path(token: str) -> str | None:
    """``token`` when it names a path inside the repository (``configs/x.yaml``, ``--out=docs/y.png``), else None."""
    token = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
    token = token.removeprefix("./")
    if not re.fullmatch(r"[\w.\-/]+", token) or "/" not in token:
        return None
    return token if token.split("/")[0] in REPO_DIRS else None


def test_the_pages_have_commands():
    assert len(PYTHON_COMMANDS) >= 10, [w for w, _ in COMMANDS]  # the extraction itself works
    scripts = {argv[1] if argv[1] != "-m" else argv[2] for _, argv in PYTHON_COMMANDS}
    assert {"train.py", "evaluate.py", "kelvin.export"} <= scripts


@pytest.mark.parametrize("where,argv", PYTHON_COMMANDS, ids=[w for w, _ in PYTHON_COMMANDS])
def test_python_command_parses_and_its_config_loads(where, argv):
    from kelvin.config_loading import load_config

    command = shlex.join(argv)
    owner = _parser_owner(argv)
    if owner is None:
        return
    args = argv[3:] if argv[1] == "-m" else argv[2:]
    namespace = _parse(owner, args, command, where)
    config = getattr(namespace, "config", None)
    if config is not None:
        assert (ROOT / config).is_file(), f"{where}: `{command}`: --config {config} does not exist"
    if hasattr(namespace, "overrides"):
        training = owner.__name__ == "kelvin.training"
        try:
            load_config(None if config is None else ROOT / config, namespace.overrides, training=training)
        except ValueError as exc:
            pytest.fail(f"{where}: `{command}`: {exc}")


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_paths_exist(where, argv):
    for token in argv:
        path = _repo_path(token)
        assert path is None or (ROOT / path).exists(), f"{where}: `{shlex.join(argv)}`: {path} does not exist"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_inline_paths_exist(page):
    names = [token for span in re.findall(r"`([^`\n]+)`", _prose(page)) for token in re.findall(r"[\w.\-/]+", span)
             if token.endswith("/") or "." in token.rsplit("/", 1)[-1]]  # a file or a folder, not `kelvin/Temperature-v0`
    missing = [path for token in names if (path := _repo_path(token)) and not (ROOT / path).exists()]
    assert not missing, f"{_rel(page)} names paths that do not exist: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", _prose(page), flags=re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {_rel(file)})")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


def _python_blocks() -> list[tuple[str, str]]:
    return [(f"{_rel(page)}:{first}", block) for page in PAGES for language, first, block in _blocks(page)
            if language == "python"]


@pytest.mark.parametrize("where,block", _python_blocks(), ids=[w for w, _ in _python_blocks()])
def test_python_block_imports_exist(where, block):
    tree = ast.parse(block, filename=where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{where}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    importlib.import_module(alias.name)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_module_attribute_references_exist(page):
    """``samplers.vllm:KelvinLogitsProcessor`` (vLLM's --logits-processors) anywhere on a page names a real class."""
    missing = []
    for module, name in set(re.findall(r"\b((?:%s)(?:\.\w+)+):(\w+)" % "|".join(PACKAGES), page.read_text())):
        if not hasattr(importlib.import_module(module), name):
            missing.append(f"{module}:{name}")
    assert not missing, f"{_rel(page)} names what does not exist: {missing}"


def test_readme_is_short_and_links_every_docs_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move a topic to docs/ (at most " \
                                           f"{README_MAX_LINES})"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(_prose(README))
              if target.startswith("docs/")}
    for target in linked:
        assert target.exists(), f"README.md links {target.relative_to(ROOT)}, which does not exist"
    unlinked = [_rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_test_command_is_what_ci_runs():
    language, first, block = _blocks(README)[0]
    assert language in SHELL_LANGUAGES, "the README's first block holds the set-up commands"
    lines = [text for _, text in logical_lines(block, first)]
    assert len(lines) == 2, f"the README's first block holds the two set-up commands, not {lines}"
    ci = [text for _, text in logical_lines((ROOT / ".ci" / "run").read_text())]
    assert "pytest" in lines[1] and lines[1] == ci[-1], \
        f"README's test command {lines[1]!r} differs from .ci/run's last command {ci[-1]!r}"
