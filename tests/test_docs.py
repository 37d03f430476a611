"""The guide's commands are real. For every command in a fenced shell block of docs/*.md and
README.md (a line starting with python, .venv/bin/python, make, accelerate launch, torchrun,
mlflow, ray or docker; backslash continuations joined; `a; b` and `a && b` are two commands):

1. exercised or marked: the command is marked as needing what this machine lacks, or its entry
   point (module, script, make target, tool subcommand) is referenced by a test (tests/*.py) or
   by CI (.ci/run) that also passes each of the command's --flags. Markers:
     - a trailing comment on the command, or on a comment line right above it, that ends with
       `# GPU`, `# cluster` or `# Docker`;
     - `<!-- needs: GPU -->` (or cluster, Docker) on the line before a fence: the whole block.
   A make target counts as exercised when CI or a test names it, or when its recipe's commands
   are exercised (the Makefile is read).
2. real flags and keys: every --flag exists in the entry point's `--help` (its usage and option
   rows, not its prose), each make target exists, each configs/ path exists, and each
   `key=value` override of a training config (train, demo, sweep, bench/sota.py) is a valid
   config key and value (sweeps: also grid.KEY / sweep.SETTING / ensembles).
3. links: every relative link in docs/*.md and README.md names a file that exists, and an
   `#anchor` into a Markdown file names one of its headings (GitHub's slugs).

Failure messages name the file, the line and the command. Fix the docs, not this test.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# where entry points are exercised: the tests and CI (not this file: its made-up page names flags)
CORPUS_FILES = [p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != "test_docs.py"] + [ROOT / ".ci" / "run"]

TRAILING_MARKER = re.compile(r"#\s*(GPU|cluster|Docker)\s*$")
BLOCK_MARKER = re.compile(r"^\s*<!--\s*needs:\s*(GPU|cluster|Docker)\s*-->\s*$")
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
HEAD = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*"
                  r"(\.venv/bin/python3?|python3?|make|accelerate\s+launch|torchrun|mlflow|ray|docker)(?:\s|$)")
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
NESTED_HEADS = PYTHONS | {"accelerate", "torchrun", "mlflow", "ray"}
FLAG = re.compile(r"^(--[A-Za-z0-9][A-Za-z0-9_-]*)")
OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)=(.*)$", re.S)
# entry points whose key=value arguments are training-config overrides, or sweep-file overrides
CONFIG_ENTRIES = {("module", "mlic_dist.train"), ("module", "mlic_dist.distill"), ("script", "bench/sota.py")}
SWEEP_ENTRIES = {("script", "launch/sweep.py"), ("module", "mlic_dist.demo")}   # the demo: unless --single


# --------------------------------------------------------------------------- reading the docs


@dataclass(frozen=True)
class DocCommand:
    path: Path
    line: int                 # 1-based line of the command's first physical line
    text: str                 # continuations joined
    needs: Optional[str]      # GPU | cluster | Docker | None

    def where(self) -> str:
        rel = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{rel}:{self.line}: {self.text}"


@dataclass(frozen=True)
class Entry:
    kind: str                 # module | script | make | tool
    name: str                 # mlic_dist.train | launch/sweep.py | demo | "mlflow models serve"
    args: tuple = field(default=())   # every token after the entry point

    @property
    def flags(self) -> list[str]:
        return [m.group(1) for t in self.args if (m := FLAG.match(t))]

    def label(self) -> str:
        return {"module": f"python -m {self.name}", "script": f"python {self.name}",
                "make": f"make {self.name}", "tool": self.name}[self.kind]


def doc_commands(path: Path) -> list[DocCommand]:
    """The commands of the fenced shell blocks of one Markdown file, with their markers."""
    lines = path.read_text().splitlines()
    out: list[DocCommand] = []
    in_block, shell, block_needs, comment_needs = False, False, None, None
    prev_outside = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence:
            if not in_block:
                in_block, shell = True, fence.group(2).lower() in SHELL_FENCES
                m = BLOCK_MARKER.match(prev_outside)
                block_needs, comment_needs = (m.group(1) if m else None), None
            else:
                in_block = False
            i += 1
            continue
        if not in_block:
            if line.strip():
                prev_outside = line
            i += 1
            continue
        start, text = i, line
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        stripped = text.strip()
        if not shell or not stripped:
            comment_needs = None
            continue
        if stripped.startswith("#"):
            m = TRAILING_MARKER.search(stripped)
            comment_needs = m.group(1) if m else None
            continue
        if HEAD.match(stripped):
            m = TRAILING_MARKER.search(stripped)
            needs = block_needs or (m.group(1) if m else None) or comment_needs
            out.append(DocCommand(path, start + 1, stripped, needs))
        comment_needs = None
    return out


def inline_commands(path: Path) -> list[DocCommand]:
    """Commands quoted inline in prose and tables (`python -m ... [--flag X]`), outside fenced
    blocks: rule 2 checks their flags; rule 1 covers the copy-and-paste blocks only. Optional
    brackets are dropped."""
    out, in_block = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            in_block = not in_block
            continue
        if in_block:
            continue
        for m in re.finditer(r"`([^`]+)`", line):
            text = re.sub(r"[\[\]]", " ", m.group(1)).strip()
            if HEAD.match(text):
                out.append(DocCommand(path, n, text, None))
    return out


def strip_comment(text: str) -> str:
    """The command without its trailing `# ...` (a # that starts a word outside quotes)."""
    quote = None
    for k, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or text[k - 1].isspace()):
            return text[:k].rstrip()
    return text


def segments(text: str) -> list[list[str]]:
    """Tokens of each simple command (`a; b`, `a && b`, `a | b` and `a & b` are separate)."""
    body = strip_comment(text)
    try:
        lex = shlex.shlex(body, posix=True, punctuation_chars=";&|")
        lex.whitespace_split, lex.commenters = True, ""
        tokens = list(lex)
    except ValueError:  # an unbalanced quote (a `bash -c "` that spans lines): plain words
        tokens = body.split()
    out, cur = [], []
    for t in tokens:
        if t and set(t) <= set(";&|"):
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    out.append(cur)
    return [s for s in out if s]


def entries(tokens: list[str]) -> list[Entry]:
    """The entry points one simple command runs (a launcher and its module; docker and the
    command it runs in the container)."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return []
    head, rest = tokens[0], tokens[1:]
    if head in PYTHONS:
        return _python(rest)
    if head == "make":
        return [Entry("make", t) for t in rest if not t.startswith("-") and "=" not in t]
    if head == "accelerate" and rest[:1] == ["launch"]:
        return _launcher("accelerate launch", rest[1:])
    if head == "torchrun":
        return _launcher("torchrun", rest)
    if head in ("mlflow", "ray"):
        sub = []
        for t in rest[:2]:
            if not re.fullmatch(r"[a-z][a-z-]*", t):
                break
            sub.append(t)
        return [Entry("tool", " ".join([head, *sub]), tuple(rest[len(sub):]))]
    if head == "docker":
        sub = rest[0] if rest else ""
        inner = next((k for k in range(2, len(tokens)) if tokens[k] in NESTED_HEADS), None)
        own = tokens[2:inner] if inner else tokens[2:]
        return [Entry("tool", f"docker {sub}", tuple(own))] + (entries(tokens[inner:]) if inner else [])
    return []


def _python(rest: list[str]) -> list[Entry]:
    for k, t in enumerate(rest):
        if t == "-m" and k + 1 < len(rest):
            return [Entry("module", rest[k + 1], tuple(rest[k + 2:]))]
        if t == "-c":
            return []
        if not t.startswith("-"):
            return [Entry("script", t, tuple(rest[k + 1:]))]
    return []


def _launcher(name: str, rest: list[str]) -> list[Entry]:
    for k, t in enumerate(rest):
        if t == "-m" and k + 1 < len(rest):
            return [Entry("tool", name, tuple(rest[:k])), Entry("module", rest[k + 1], tuple(rest[k + 2:]))]
        if t.endswith(".py"):
            return [Entry("tool", name, tuple(rest[:k])), Entry("script", t, tuple(rest[k + 1:]))]
    return [Entry("tool", name, tuple(rest))]


def command_entries(cmd: DocCommand) -> list[Entry]:
    return [e for seg in segments(cmd.text) for e in entries(seg)]


# --------------------------------------------------------------------------- the Makefile


def make_targets(makefile: Path = ROOT / "Makefile") -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines with $(BIN)/$(PY) spelled out)."""
    text = makefile.read_text()
    variables = dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", text, re.M))
    targets: dict[str, tuple[list[str], list[str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.$()/-]+)\s*:(?!=)\s*(.*)$", line)
        if m and not line.startswith("\t"):
            name = m.group(1)
            current = None if name.startswith(".") else name
            if current:
                targets[current] = (m.group(2).split(), [])
            continue
        if current and line.startswith("\t"):
            recipe = line.strip()
            for _ in range(3):  # nested variables: $(BIN) -> $(VENV)/bin -> .venv/bin
                recipe = re.sub(r"\$\((\w+)\)", lambda v: variables.get(v.group(1), v.group(0)), recipe)
            targets[current][1].append(recipe)
    return targets


# --------------------------------------------------------------------------- rule 1: exercised


def reference_pattern(entry: Entry) -> re.Pattern:
    """How a test (or CI) names the entry point."""
    if entry.kind == "module":
        pkg, _, last = entry.name.rpartition(".")
        alts = [rf"\b{re.escape(entry.name)}\b(?!\.)"]
        if pkg:
            alts.append(rf"\bfrom {re.escape(pkg)} import [^\n]*\b{re.escape(last)}\b")
        return re.compile("|".join(alts))
    if entry.kind == "script":
        parts = [re.escape(p) for p in Path(entry.name).parts]
        return re.compile(r"\W{1,8}".join(parts))
    if entry.kind == "make":
        return re.compile(rf"\bmake\s+{re.escape(entry.name)}\b")
    words = entry.name.split()
    return re.compile(r"\b" + r"\W{1,8}".join(re.escape(w) for w in words) + r"\b")


def flag_pattern(flag: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(flag)}(?![\w-])")


def unexercised(entry: Entry, corpus: dict[Path, str], targets: dict, seen: frozenset = frozenset()) -> list[str]:
    """Why the entry is not exercised by the corpus ([] when it is)."""
    ref = reference_pattern(entry)
    files = [text for text in corpus.values() if ref.search(text)]
    if entry.kind == "make":
        if files:
            return []
        if entry.name not in targets:
            return [f"make target {entry.name!r} is not in the Makefile"]
        # a prerequisite of an exercised target is exercised with it
        for other, (prereqs, _) in targets.items():
            if entry.name in prereqs and other not in seen and \
                    not unexercised(Entry("make", other), corpus, targets, seen | {entry.name}):
                return []
        problems = []
        for recipe in targets[entry.name][1]:
            for sub in (e for seg in segments(recipe) for e in entries(seg)):
                if sub.kind in ("module", "script") and not _external(sub):
                    problems += [f"make {entry.name} runs `{sub.label()}`: {p}"
                                 for p in unexercised(sub, corpus, targets, seen | {entry.name})]
        if not targets[entry.name][1]:
            problems.append(f"make {entry.name} has no recipe and no test or CI names it")
        return problems
    if not files:
        return [f"no test (tests/*.py) or CI (.ci/run) runs `{entry.label()}`"]
    missing = [f for f in entry.flags if not any(flag_pattern(f).search(t) for t in files)]
    return [f"{f} of `{entry.label()}` is passed by no test or CI that runs it" for f in missing]


def _external(entry: Entry) -> bool:
    """python -m venv / pip: not the project's."""
    return entry.kind == "module" and not entry.name.startswith("mlic_dist")


def exercise_problems(commands: list[DocCommand], corpus: dict[Path, str], targets: dict) -> list[str]:
    problems = []
    for cmd in commands:
        if cmd.needs:
            continue
        found = command_entries(cmd)
        if not found:
            problems.append(f"{cmd.where()}\n    -> no entry point recognised")
        for entry in found:
            if entry.kind == "tool" and entry.name.startswith("docker"):
                problems.append(f"{cmd.where()}\n    -> docker is not available to the tests: mark it `# Docker`")
                continue
            for why in unexercised(entry, corpus, targets):
                problems.append(f"{cmd.where()}\n    -> {why}; mark the command `# GPU`, `# cluster` or "
                                f"`# Docker` if it needs one, or use flags the tests run")
    return problems


# --------------------------------------------------------------------------- rule 2: real flags


def help_request(entry: Entry, sub: Optional[str] = None) -> Optional[tuple[str, str, list[str]]]:
    """How to ask the entry point for its --help: (module | path, target, argv), or None (docker:
    not installed here, and its flags are docker's own)."""
    extra = [sub] if sub else []
    if entry.kind == "module":
        return ("module", entry.name, [entry.name, *extra, "--help"])
    if entry.kind == "script":
        return ("path", str(ROOT / entry.name), [entry.name, *extra, "--help"])
    if entry.kind == "tool":
        head, *words = entry.name.split()
        if head == "docker" or not (BIN / head).is_file():
            return None
        # the virtualenv's console script (mlflow, ray, accelerate, torchrun) is a Python file
        return ("path", str(BIN / head), [head, *words, *extra, "--help"])
    return None


def defined_flags(help_text: str) -> set[str]:
    """The flags a --help defines: those of its usage block and its option rows (argparse and
    click indent them by two spaces), not those its description mentions."""
    flags: set[str] = set()
    lines = help_text.splitlines()
    in_usage = False
    for line in lines:
        if line.lower().startswith("usage:"):
            in_usage = True
        elif in_usage and not line.strip():
            in_usage = False
        if in_usage:
            flags |= set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", line))
        elif re.match(r"^ {1,2}--?[A-Za-z0-9]", line):   # an option row (prose and wrapped help are indented more)
            spec = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            flags |= set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", spec))
    return flags


# Runs the --help of many entry points in ONE process, each as its command line would (runpy as
# __main__, sys.argv set), so torch, mlflow and ray are imported once instead of once per command.
_HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
out = []
for how, target, argv in json.loads(sys.argv[1]):
    buf, rc = io.StringIO(), 0
    sys.argv = list(argv)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            if how == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        rc = 1
        buf.write(f"{type(e).__name__}: {e}")
    out.append([rc, buf.getvalue()])
sys.__stdout__.write(json.dumps(out))
"""


def run_helps(requests: list[tuple[str, str, list[str]]]) -> list[tuple[int, str]]:
    """(exit status, --help output) of each help_request(), in one subprocess."""
    import json

    if not requests:
        return []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    p = subprocess.run([sys.executable, "-c", _HELP_RUNNER, json.dumps(requests)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=env)
    assert p.returncode == 0, f"the --help runner failed: {p.stderr[-3000:]}"
    return [tuple(r) for r in json.loads(p.stdout)]


def is_sweep(entry: Entry) -> bool:
    return (entry.kind, entry.name) in SWEEP_ENTRIES and "--single" not in entry.args


def config_problems(entry: Entry) -> list[str]:
    """key=value overrides of a training config or a sweep file that the config would refuse."""
    from mlic_dist.config import Config, ConfigError, apply_overrides, config_from_dict, flatten, to_dict

    overrides = [t for t in entry.args if OVERRIDE.match(t) and not t.startswith("-")]
    if not overrides:
        return []
    if is_sweep(entry):
        from mlic_dist.sweep.spec import SweepSettings

        keys = set(flatten(to_dict(Config())))
        settings = {f.name for f in SweepSettings.__dataclass_fields__.values()}
        problems, plain = [], []
        for o in overrides:
            key = OVERRIDE.match(o).group(1)
            if key.startswith("grid."):
                if key[5:] not in keys:
                    problems.append(f"{o}: grid key {key[5:]!r} is not a config key")
            elif key.startswith("sweep."):
                if key[6:] not in settings:
                    problems.append(f"{o}: {key[6:]!r} is not a sweep setting ({sorted(settings)})")
            elif key != "ensembles":
                plain.append(o)
        overrides = plain
    else:
        problems = []
    try:
        config_from_dict(apply_overrides(to_dict(Config()), overrides))
    except ConfigError as e:
        problems.append(str(e))
    return problems


def flag_problems(commands: list[DocCommand], help_of: Callable[[Entry, Optional[str]], Optional[tuple[int, str]]],
                  targets: dict) -> list[str]:
    problems = []
    for cmd in commands:
        for entry in command_entries(cmd):
            where = cmd.where()
            if entry.kind == "make":
                if entry.name not in targets:
                    problems.append(f"{where}\n    -> make target {entry.name!r} is not in the Makefile")
                continue
            for token in entry.args:
                if token.startswith("configs/") and not (ROOT / token).exists():
                    problems.append(f"{where}\n    -> {token} does not exist")
            if (entry.kind, entry.name) in CONFIG_ENTRIES | SWEEP_ENTRIES:
                problems += [f"{where}\n    -> {p}" for p in config_problems(entry)]
            if entry.kind == "script" and not (ROOT / entry.name).is_file():
                problems.append(f"{where}\n    -> {entry.name} does not exist")
                continue
            if not entry.flags:
                continue
            got = help_of(entry, None)
            if got is None:   # docker: not installed here, and its flags are docker's own
                continue
            rc, text = got
            if rc != 0:
                problems.append(f"{where}\n    -> `{entry.label()} --help` failed (exit {rc}): {text.strip()[-300:]}")
                continue
            known = defined_flags(text)
            missing = [f for f in entry.flags if f not in known]
            positional = next((t for t in entry.args if re.fullmatch(r"[a-z][a-z_-]*", t)), None)
            if missing and positional:  # a subcommand's own flags (`shard verify DIR --decode`)
                sub = help_of(entry, positional)
                if sub is not None and sub[0] == 0:
                    known |= defined_flags(sub[1])
                    missing = [f for f in entry.flags if f not in known]
            problems += [f"{where}\n    -> {f} is not an option of `{entry.label()}` (see its --help)"
                         for f in missing]
    return problems


# --------------------------------------------------------------------------- rule 3: links


def github_slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_block = False
    for line in path.read_text().splitlines():
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            in_block = not in_block
            continue
        m = None if in_block else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside code."""
    out = []
    in_block = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            in_block = not in_block
            continue
        if in_block:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        out += [(n, m.group(1)) for m in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)]
        ref = re.match(r"^\s*\[[^\]]+\]:\s*(\S+)", prose)
        if ref:
            out.append((n, ref.group(1)))
    return out


def link_problems(paths: list[Path]) -> list[str]:
    problems = []
    for path in paths:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for n, target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):   # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{rel}:{n}: link {target} -> {dest} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{rel}:{n}: link {target} -> no heading #{anchor} in {dest.name}")
    return problems


# --------------------------------------------------------------------------- the tests


def all_commands() -> list[DocCommand]:
    return [c for path in DOC_FILES for c in doc_commands(path)]


def all_inline_commands() -> list[DocCommand]:
    return [c for path in DOC_FILES for c in inline_commands(path)]


def corpus() -> dict[Path, str]:
    return {p: p.read_text() for p in CORPUS_FILES if p.is_file()}


def test_docs_have_commands_to_check():
    commands = all_commands()
    assert len(commands) >= 40 and {c.path.name for c in commands} >= {"README.md", "quickstart.md", "sweeps.md"}


def test_every_doc_command_is_exercised_by_a_test_or_marked():
    problems = exercise_problems(all_commands(), corpus(), make_targets())
    assert not problems, "doc commands no test or CI runs with these flags:\n" + "\n".join(problems)


def test_every_documented_flag_override_and_config_file_exists():
    commands = all_commands() + all_inline_commands()
    keys = set()
    for cmd in commands:
        for entry in command_entries(cmd):
            if entry.flags and help_request(entry) is not None:
                positional = next((t for t in entry.args if re.fullmatch(r"[a-z][a-z_-]*", t)), None)
                keys |= {(entry.kind, entry.name, sub) for sub in {None, positional}}
    keys = sorted(keys, key=str)
    cache = dict(zip(keys, run_helps([help_request(Entry(k, n), sub) for k, n, sub in keys])))

    def help_of(entry: Entry, sub: Optional[str]):
        key = (entry.kind, entry.name, sub)
        if key not in cache:
            request = help_request(entry, sub)
            if request is None:
                return None
            cache[key] = run_helps([request])[0]
        return cache[key]

    problems = flag_problems(commands, help_of, make_targets())
    assert not problems, "doc commands with flags, files or keys their CLI does not have:\n" + "\n".join(problems)


def test_every_relative_link_resolves():
    problems = link_problems(DOC_FILES)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The rules on a made-up page: each kind of mistake is reported with its file and line, and
    marked commands are let through."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "# Title",
        "See [the other page](missing.md), [a section](#title), [no section](#nowhere).",
        "```bash",
        "python -m mlic_dist.evaluate --run-dir runs/x --no-such-flag   # line 4",
        "python -m mlic_dist.train --config configs/none.yaml data.sise=3",
        "python -m mlic_dist.train --config configs/base.yaml \\",
        "    --print-config                                               # GPU",
        "# 8 GPUs                                                          # cluster",
        "torchrun --nproc_per_node 8 -m mlic_dist.train --config configs/base.yaml",
        "make bench-nothing; make test",
        "```",
        "<!-- needs: Docker -->",
        "```bash",
        "docker run --rm img python -m mlic_dist.evaluate --run-dir r",
        "```",
        "Inline, `python -m mlic_dist.evaluate --run-dir R [--bogus X]`, is checked for flags only.",
    ]) + "\n")
    commands = doc_commands(page)
    assert [(c.line, c.needs) for c in commands] == [(4, None), (5, None), (6, "GPU"), (9, "cluster"),
                                                     (10, None), (14, "Docker")]
    assert command_entries(commands[3]) == [Entry("tool", "torchrun", ("--nproc_per_node", "8")),
                                            Entry("module", "mlic_dist.train", ("--config", "configs/base.yaml"))]
    fake_corpus = {Path("t.py"): 'run(["-m", "mlic_dist.evaluate", "--run-dir", d])\nmake test\n'
                                 'run(["-m", "mlic_dist.train", "--config", c])'}
    targets = {"test": ([], ["python -m pytest -q tests"])}
    exercised = exercise_problems(commands, fake_corpus, targets)
    assert any(":4: python -m mlic_dist.evaluate" in p and "--no-such-flag" in p for p in exercised)
    assert any(":10: make bench-nothing" in p and "not in the Makefile" in p for p in exercised)
    assert not any(":6:" in p or ":9:" in p or ":14:" in p or "make test`" in p for p in exercised)
    assert len(exercised) == 2

    inline = inline_commands(page)
    assert [(c.line, c.text) for c in inline] == [(16, "python -m mlic_dist.evaluate --run-dir R  --bogus X")]

    helps = {"mlic_dist.evaluate": "usage: evaluate [-h]\n                [--run-dir RUN_DIR]\n\nSee also:\n"
                                   "    --sneaky in prose defines nothing\n\noptions:\n  --run-dir RUN_DIR  x\n",
             "mlic_dist.train": "usage: train [-h] [--config CONFIG] [--print-config]\n",
             "torchrun": "usage: torchrun [--nproc_per_node N]\n"}
    assert defined_flags(helps["mlic_dist.evaluate"]) == {"--run-dir"}
    flagged = flag_problems(commands + inline, lambda e, sub: (0, helps.get(e.name, "")) if e.kind != "tool"
                            or e.name == "torchrun" else None, targets)
    assert any(":16: python -m mlic_dist.evaluate" in p and "--bogus is not an option" in p for p in flagged)
    assert any(":4: python -m mlic_dist.evaluate" in p and "--no-such-flag is not an option" in p for p in flagged)
    assert any(":5: python -m mlic_dist.train" in p and "configs/none.yaml does not exist" in p for p in flagged)
    assert any(":5: python -m mlic_dist.train" in p and "data.sise" in p for p in flagged)
    assert any(":10: make bench-nothing" in p for p in flagged)
    assert len(flagged) == 5, flagged

    broken = link_problems([page])
    assert len(broken) == 2 and any(":2: link missing.md" in p for p in broken) \
        and any("no heading #nowhere" in p for p in broken)
