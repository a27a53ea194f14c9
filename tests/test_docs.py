"""The docs are tested: what README.md, docs/*.md and examples/README.md show users to copy must work.

1. Every ```python block runs as written (a fresh namespace, a temporary working directory and data
   cache, torch.manual_seed(0), one thread). A block that cannot run here says why in a line of its
   own, ``# doc-test: skip (needs CUDA)``, and is skipped with that reason.
2. Every command line of a shell block (```bash / sh / console / shell, and a plain ``` block whose
   line starts with a known command) is checked without running it: ``bise ...`` / ``python -m bise
   ...`` is parsed by the CLI's own argparse parser (bise.cli.build_parser), ``python -m bise_kernels
   ...`` by bise_kernels.info.build_parser, ``pytest PATH...`` / ``python X.py`` / ``bash X.sh`` must
   name files that exist, ``pip install`` extras must be in pyproject.toml. A command the test does
   not know fails in a fenced shell block (add it to IGNORED or check it), so nothing goes unchecked
   silently.
3. Every relative Markdown link (and its #anchor, against the target's headings) and every inline
   code path into the repository (`bise/x.py`, `docs/y.md`, `tests/...`; globs and {a,b} too) exists;
   every inline `bise.x.y` / `bise_kernels.x` / `bk.x` name resolves; every inline command is checked
   as in 2, as a fragment (prose leaves out --out and ends in `...`), and REJECTED lists the ones
   shown as errors, which must be rejected.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import importlib
import inspect
import io
import re
import shlex
import time
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SKIP = re.compile(r"^\s*# doc-test: skip \((.+)\)\s*$", re.M)
# placeholders of the docs' command lines -> a value the parser accepts (keep this small)
PLACEHOLDERS = {"<sha>": "0" * 40, "bise COMMAND": "bise run"}
# first words of shell commands that nothing here can check (pip download, git, cd)
IGNORED = {"pip", "git", "cd"}
# inline code that is a command line; those of it shown as errors, or that are no command
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:bise|python3?|pytest|bash|torchrun|pip) ")
REJECTED = {"bise export --budget 0.3"}
NOT_COMMANDS = {"bise COMMAND: error: ..."}
# short module names of the docs' inline code (`bk.topk_mask`, `reference.keep_mask`) -> the module
ALIASES = {"bk": "bise_kernels", "reference": "bise_kernels.backends.reference",
           "native": "bise_kernels.backends.native", "_ops": "bise_kernels._ops",
           "functional": "bise_kernels.functional", "_checks": "bise_kernels._checks"}
API_NAME = re.compile(rf"(?<![\w./])((?:bise|bise_kernels|{'|'.join(ALIASES)})(?:\.\w+)+)")
# the API tables (first column: signatures) and where their names live
API_TABLES = {"README.md": ("bise_kernels", "bise_kernels.nn"), "docs/ops.md": ("bise_kernels", "bise_kernels.nn"),
              "docs/data.md": ("bise.data",)}
# inline code that names a repository file: a top-level folder of the repo, then a path
REPO_PATH = re.compile(r"^(?:bise|bise_kernels|docs|benchmarks|scripts|tests|examples|csrc|\.ci)/[\w./*{},-]*$")


# --------------------------------------------------------------------------------------------- parsing

def _rel(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def parse_doc(text: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """The fenced blocks, as (line number of the fence, language, body), and the other lines, as
    (line number, line)."""
    blocks, prose, lines, i = [], [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, j = m.group(1), i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        blocks.append((i + 1, m.group(2).lower(), "\n".join(lines[i + 1:j])))
        i = j + 1
    return blocks, prose


def paragraphs(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(first line number, text) of each run of non-blank lines: inline code may wrap a line."""
    out = []
    for n, line in prose:
        if not line.strip():
            continue
        if out and out[-1][0] + out[-1][1].count("\n") + 1 == n:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        else:
            out.append((n, line))
    return out


def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces -> -)."""
    seen, out = {}, set()
    for _, line in parse_doc(doc.read_text())[1]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            k = seen.get(slug, 0)
            seen[slug] = k + 1
            out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def _cases(kind: str) -> list:
    cases = []
    for doc in DOCS:
        for line, lang, body in parse_doc(doc.read_text())[0]:
            if kind == "python" and lang == "python":
                cases.append(pytest.param(doc, line, body, id=f"{_rel(doc)}:{line}"))
            elif kind == "shell" and (lang in SHELL_LANGS or lang == ""):
                cases.append(pytest.param(doc, line, lang, body, id=f"{_rel(doc)}:{line}"))
    return cases


def command_lines(body: str) -> list[tuple[int, str]]:
    """(offset, line) of each logical line: `\\` continuations joined, `$ ` prompts dropped; a line of
    a console block without a prompt is output and dropped."""
    out, pending, start = [], "", 0
    lines = body.split("\n")
    prompted = any(line.startswith("$ ") for line in lines)
    for k, line in enumerate(lines):
        if not pending:
            start = k
            if prompted:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at && || ; |), leading VAR=value dropped,
    $(...) replaced by a word, comments removed, placeholders substituted."""
    line = re.sub(r"\$\([^)]*\)", "SUBST", line)
    for key, value in PLACEHOLDERS.items():
        line = line.replace(key, value)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    out, cur = [], []
    for tok in lexer:
        if tok and set(tok) <= set(";&|"):
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    out.append(cur)
    result = []
    for words in out:
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            words = words[1:]
        if words:
            result.append(words)
    return result


# --------------------------------------------------------------------------------------------- checks

def _parse(parser: argparse.ArgumentParser, args: list[str]) -> None:
    """Parse only; argparse reports a rejection on stderr and exits: turn that into a failure. The docs
    spell options in full: an abbreviation (--finetune-epoch) is refused here."""
    parsers = [parser]
    for p in parsers:
        p.allow_abbrev = False
        parsers += [c for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values()]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code:
            raise AssertionError(f"rejected: {err.getvalue().strip()}") from None


def _options_of(parser: argparse.ArgumentParser, args: list[str]) -> None:
    """A fragment's subcommand exists and takes each of its --options (spelled in full)."""
    if not args or args[0].startswith("-"):
        unknown = [a for a in args if a.startswith("-") and a not in parser._option_string_actions]
    else:
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        assert args[0] in subcommands, f"no subcommand {args[0]!r}"
        unknown = [a for a in args[1:] if a.startswith("-") and a not in subcommands[args[0]]._option_string_actions]
    assert not unknown, f"no option {unknown}"


def _exists(path: str) -> bool:
    path = path.split("::")[0]
    if any(c in path for c in "*?[{"):
        return all(glob.glob(str(ROOT / p)) for p in _braces(path))
    return (ROOT / path).exists()


def _braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _braces(path[:m.start()] + alt + path[m.end():])]


def _resolves(name: str) -> bool:
    """`bise.extract.read_checkpoint`, `bk.topk_mask`: a module path then attributes (a submodule wins
    over a same-named attribute: bise.evaluate is both)."""
    parts = name.split(".")
    parts = [*ALIASES.get(parts[0], parts[0]).split("."), *parts[1:]]
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 2):
        with contextlib.suppress(ImportError):
            obj = importlib.import_module(".".join(parts[:i]))
            continue
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _script_flags(script: str, args: list[str]) -> None:
    """A script's options (--x) must be spelled in its source (the scripts build their parsers inline)."""
    text = (ROOT / script).read_text()
    if script.endswith(".py") and "argparse" not in text:
        return  # setup.py: setuptools' options
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in text]
    assert not unknown, f"{script} has no option {unknown}"


def check_command(words: list[str], fragment: bool = False) -> bool:
    """Check one command, running nothing; False if it is not one this test knows. A fragment (inline
    code in prose: `bise run --mask-set`, `bise extract --model M`, `bise run ...`) names the options
    of its subcommand, with or without values."""
    from bise.cli import build_parser as bise_parser
    from bise_kernels.info import build_parser as info_parser

    prog, args = words[0], [w for w in words[1:] if not (fragment and w == "...")]
    if prog == "torchrun" and "-m" in args:
        prog, args = "python", args[args.index("-m"):]
    if prog in ("python", "python3") and args[:2] == ["-m", "bise"]:
        prog, args = "bise", args[2:]
    if prog == "bise" and fragment:
        _options_of(bise_parser(), args)
    elif prog == "bise":
        _parse(bise_parser(), args)
    elif prog in ("python", "python3") and args[:2] == ["-m", "bise_kernels"]:
        _parse(info_parser(), args[2:])
    elif prog == "pytest" or (prog in ("python", "python3") and args[:2] == ["-m", "pytest"]):
        paths = [a for a in (args if prog == "pytest" else args[2:]) if not a.startswith("-") and "/" in a]
        missing = [p for p in paths if not _exists(p)]
        assert not missing, f"pytest of missing paths {missing}"
    elif prog in ("python", "python3", "bash") and args and args[0].endswith((".py", ".sh")):
        assert _exists(args[0]), f"{args[0]} does not exist"
        _script_flags(args[0], args[1:])
    elif prog == "pip" and args[:1] == ["install"]:
        for spec in args[1:]:
            m = re.match(r"^bise-kernels\[([\w,-]+)\]$", spec)
            if m:
                unknown = set(m.group(1).split(",")) - _extras()
                assert not unknown, f"{spec}: no extra {sorted(unknown)} in pyproject.toml"
    else:
        return prog in IGNORED
    return True


def _lookup(name: str, modules: tuple[str, ...]):
    """`Split.inputs` in the first of `modules` that has it."""
    for module in modules:
        obj = importlib.import_module(module)
        with contextlib.suppress(AttributeError):
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
    raise AssertionError(f"{name} is in none of {modules}")


# --------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A data cache of this module's own (never the user's), shared by the blocks."""
    return str(tmp_path_factory.mktemp("docs_cache"))


@pytest.mark.parametrize("doc, line, body", _cases("python"))
def test_python_block_runs(doc, line, body, tmp_path, monkeypatch, cache_dir):
    """Runs the block as written; skipped where it says so, or where the data or an extra it needs is
    not installed here (the rest of the suite skips then too)."""
    from bise import _extra
    from bise.data import SourceMissing

    skip = SKIP.search(body)
    if skip:
        pytest.skip(f"{_rel(doc)}:{line}: {skip.group(1)}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BISE_CACHE_DIR", cache_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on a shared 2-core machine: one thread is far faster
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):  # the suite's RNG kept
            torch.manual_seed(0)
            # padded so that a traceback gives the doc's own file and line numbers
            exec(compile("\n" * line + body, str(doc), "exec"), {"__name__": "__doc_block__"})
    except SourceMissing as exc:
        pytest.skip(f"{_rel(doc)}:{line}: data not installed: {exc}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in (*_extra.MODULES, "sklearn", "skimage"):
            raise
        pytest.skip(f"{_rel(doc)}:{line}: an extra is not installed: {exc}")
    finally:
        torch.set_num_threads(threads)
    print(f"{_rel(doc)}:{line} ran in {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("doc, line, lang, body", _cases("shell"))
def test_shell_block_commands(doc, line, lang, body):
    checked = 0
    for offset, text in command_lines(body):
        where = f"{_rel(doc)}:{line + 1 + offset}: {text.strip()}"
        if not lang and not re.match(r"^\s*(bise|python3?|pytest|bash)\s", text):
            continue  # a plain block: only its command lines (the others are layouts, JSON, grammars)
        calls = [w for m in re.finditer(r'run\(command="([^"]+)"', text) for w in commands(m.group(1))]
        for words in [*commands(text), *calls]:  # calls: of the device tool, in a comment
            try:
                known = check_command(words)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from None
            if lang:  # a fenced shell block: every command is checked or explicitly ignored
                assert known, f"{where}: unknown command {words[0]!r} (check it in test_docs.py or add it to IGNORED)"
            checked += known
    if lang:
        assert checked, f"{_rel(doc)}:{line}: a shell block with no command"


@pytest.mark.parametrize("doc", DOCS, ids=[_rel(d) for d in DOCS])
def test_prose_links_paths_and_commands(doc):
    """Links, repository paths, API names and commands (fragments: see check_command) outside blocks."""
    bad = []
    for first, text in paragraphs(parse_doc(doc.read_text())[1]):
        for m in re.finditer(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            target, where = m.group(1), f"{_rel(doc)}:{first + text[:m.start()].count(chr(10))}"
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                bad.append(f"{where}: link to missing {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                bad.append(f"{where}: link to missing heading {target}")
        for m in re.finditer(r"`([^`]+)`", text):
            code, where = " ".join(m.group(1).split()), f"{_rel(doc)}:{first + text[:m.start()].count(chr(10))}"
            for token in code.split():
                token = token.rstrip(".,;:)")
                if REPO_PATH.match(token) and not _exists(token):
                    bad.append(f"{where}: `{token}` does not exist")
            for name in API_NAME.findall(code):
                if not name.endswith((".py", ".md")) and not _resolves(name):
                    bad.append(f"{where}: `{name}` does not resolve")
            if not COMMAND.match(code) or code in NOT_COMMANDS:
                continue
            try:
                for words in commands(code):
                    check_command(words, fragment=True)
            except AssertionError as exc:
                if code not in REJECTED:
                    bad.append(f"{where}: `{code}`: {exc}")
            else:
                if code in REJECTED:
                    bad.append(f"{where}: `{code}` is accepted, but the doc shows it as an error")
    assert not bad, "\n".join(bad)


def test_cli_option_table_matches_the_parser():
    """docs/cli.md's option table lists every option of every `bise` subcommand, with the subcommands
    that take it ("all", "all but export", "run, extract") and the parser's default where it has one."""
    from bise.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    takes, actions = {}, {}
    for name, sub in subcommands.items():
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    takes.setdefault(option, set()).add(name)
                    actions[option] = action
    table = {}
    for line in (ROOT / "docs" / "cli.md").read_text().split("\n"):
        m = re.match(r"^\| ((?:`--[^`]+`(?:, )?)+) \| ([^|]+) \| ([^|]+) \|", line)
        if m:
            where = m.group(2).strip()
            names = (set(subcommands) if where == "all" else
                     set(subcommands) - {w.strip("` ") for w in where[len("all but "):].split(",")}
                     if where.startswith("all but ") else {w.strip("` ") for w in where.split(",")})
            for option in re.findall(r"`(--[\w-]+)", m.group(1)):
                table[option] = (names, m.group(3).strip())
    wrong = {o: (sorted(table.get(o, [[]])[0]), sorted(takes.get(o, []))) for o in {*table, *takes}
             if table.get(o, [None])[0] != takes.get(o)}
    assert not wrong, f"option: (subcommands in docs/cli.md, subcommands that take it) {wrong}"
    for option, (_, default) in table.items():
        value = actions[option].default
        if isinstance(value, bool):  # store_true / store_false: the option is off unless given
            assert default == "off", (option, default)
        elif value is not None:
            assert str(value) in default, (option, value, default)


def test_cli_file_tables_name_every_output():
    """docs/cli.md: the commands table names the files each command writes (the report's plots as
    "plots"), and the file table describes every one (`subnetwork.pt` + `.json`: both)."""
    from bise.cli import OUTPUTS

    rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for _, line in parse_doc((ROOT / "docs" / "cli.md").read_text())[1] if line.startswith("| `")]
    writes = {row[0].strip("`"): row[-1] for row in rows if len(row) == 3 and row[0].strip("`") in OUTPUTS}
    assert writes.keys() == OUTPUTS.keys()
    for command, files in OUTPUTS.items():
        shown = [f for f in files if f"`{f}`" in writes[command] or (f.endswith(".png") and "plots" in writes[command])]
        assert shown == list(files), (command, writes[command])
    described = set()
    for row in rows:
        stem = None
        for code in re.findall(r"`([^`]+)`", row[0]) if len(row) == 2 else []:
            described.add(stem + code if code.startswith(".") and stem else code)
            stem = code.rsplit(".", 1)[0]
    missing = {f for files in OUTPUTS.values() for f in files} - described
    assert not missing, f"not in docs/cli.md's file table: {sorted(missing)}"


def test_builtin_table_matches_the_benchmarks():
    """docs/data.md's built-in table: every benchmark of bise.data, with its default rho, whether it has
    a validation split (n_val=0: none) and its weighting."""
    from bise.data.builtin import BUILTINS

    table = {}
    for _, line in parse_doc((ROOT / "docs" / "data.md").read_text())[1]:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 8 and cells[0].strip("`") in BUILTINS:
            table[cells[0].strip("`")] = (cells[4], cells[6], cells[7])
    assert table.keys() == BUILTINS.keys()
    for name, bench in BUILTINS.items():
        opts = bench.options
        rho = f"rho_l {opts['rho_l']}, rho_r {opts['rho_r']}" if bench.num_biases == 2 else str(opts["rho"])
        assert table[name] == (rho, "no" if opts["n_val"] == 0 else "yes", bench.weighting), name


def test_op_schemas_are_the_registered_ones():
    """docs/ops.md's op schemas (`topk_select(Tensor[] scores, SymInt k, Tensor? hint) -> (Tensor, Tensor)`)
    are those of torch.ops.bise_kernels, as torch prints them (an abbreviated `name(...)` is skipped)."""
    import bise_kernels  # noqa: F401  (registers the ops)

    shown = re.findall(r"`((\w+)\([^`.]*\) -> [^`]+)`", (ROOT / "docs" / "ops.md").read_text())
    assert len(shown) >= 8
    for schema, name in shown:
        assert str(getattr(torch.ops.bise_kernels, name).default._schema) == f"bise_kernels::{schema}"


@pytest.mark.parametrize("name", API_TABLES)
def test_api_table_signatures(name):
    """A signature in the first column of an API table (`topk_mask(scores, density, *, hint=None)`,
    `Split.inputs(index=None)`) has the function's parameters, in order, keyword-only where it says `*`,
    with its defaults where it gives one (`name(...)`, `f(a, b=None (note))`: prose, skipped)."""
    checked, bad = 0, []
    for n, line in parse_doc((ROOT / name).read_text())[1]:
        if not line.startswith("| `"):
            continue
        for code in re.findall(r"`(\w[\w.]*\([^`]*\))`", line.split(" | ")[0]):
            fn, params = code.split("(", 1)
            if "..." in params or "|" in params or "(" in params:  # abbreviated or annotated: prose
                continue
            obj = _lookup(fn, API_TABLES[name])
            args = ast.parse(f"def f({params[:-1]}): pass").body[0].args
            real = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
            shown = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in args.args] + \
                    [(a.arg, inspect.Parameter.KEYWORD_ONLY) for a in args.kwonlyargs]
            defaults = dict(zip([a.arg for a in args.args][::-1], args.defaults[::-1]))
            defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
            if shown != [(p.name, p.kind) for p in real] or any(
                    ast.literal_eval(d) != real[[p.name for p in real].index(k)].default for k, d in defaults.items()):
                bad.append(f"{name}:{n}: `{code}`, but {fn}{inspect.signature(obj)}")
            checked += 1
    assert checked and not bad, "\n".join(bad)


def test_shell_lines_are_split_as_a_shell_would():
    """The parsing of test_shell_block_commands on what no doc has yet: `$ ` prompts with output lines,
    a `\\` continuation, VAR=value prefixes, `&&`, $(...) and comments."""
    body = "$ bise run --data colored-digits \\\n    --out runs/x  # a comment\nsome output\n" \
           "$ A=$(git rev-parse HEAD) python -m bise_kernels --json && pytest tests/test_docs.py"
    lines = command_lines(body)
    assert [offset for offset, _ in lines] == [0, 3]
    assert [commands(text) for _, text in lines] == [
        [["bise", "run", "--data", "colored-digits", "--out", "runs/x"]],
        [["python", "-m", "bise_kernels", "--json"], ["pytest", "tests/test_docs.py"]]]
    assert [check_command(words) for _, text in lines for words in commands(text)] == [True, True, True]


def test_exceptions_are_in_the_docs():
    """REJECTED and NOT_COMMANDS name inline code of the docs: one gone from the docs goes here too."""
    text = "".join(doc.read_text() for doc in DOCS)
    assert [c for c in REJECTED | NOT_COMMANDS if f"`{c}`" not in text] == []
