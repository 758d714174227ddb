"""The tables of docs/reference.md cannot go stale: each one is compared with
what exists. Execution and state functions with what a real `salt-call
--local` lists after `saltutil.sync_all` from this repository (the beacons
with what that sync shipped), minion options with `OPTIONS`, pillar keys with
`DEFAULTS`, the fields of a kind of daemon (`sstuning_daemons.FIELDS` and
`ALIASES`) and `pillar.example`. A missing row, a row for something that does
not exist, or a default that differs fails. And every link of README.md and
docs/*.md to a file of this repository resolves, anchors included.

The format parsed: a `## ` heading starting with "Execution functions",
"State functions", "Beacons", "Minion options", "Pillar keys" or "The fields
of a kind of daemon", then a Markdown table (header, separator, one row per
line; a `|` inside a cell is written `\\|`). In the first cell, every `code
span` names one thing by its first word (what follows is a signature: `get
KEY [KEY...]`). Minion options are written `shadowsocks_tuning.NAME`, pillar
keys as a colon path under `shadowsocks:tuning` (a profile's fields as
`profiles:NAME:include`, a kind's as `limits:KIND:units`). For options and
pillar keys the second cell holds the default as code spans: one per list
item, `[]`, `{}`, `null`, the value itself, or none (`—`) for a mapping whose
keys have rows of their own or a field whose value each kind sets."""

import re

import pytest
import yaml

from support.common import REPO

from sstuning_daemons import ALIASES, FIELDS as KIND_FIELDS, KINDS
from sstuning_settings import DEFAULTS, OPTIONS, PROFILE_FIELDS

REFERENCE = REPO / "docs" / "reference.md"
NO_DEFAULT = object()  # a profile's and a kind's fields: no default of their own
KIND_SECTION = "The fields of a kind of daemon"
SUBSECTIONS = ("Execution functions", "State functions", "Beacons", "Minion options", "Pillar keys", KIND_SECTION)
OPTION_PREFIX = "shadowsocks_tuning."


def _cells(line):
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [cell.strip().replace("\\|", "|") for cell in cells[1:-1]]


def _spans(cell):
    return re.findall(r"`([^`]+)`", cell)


def reference_tables(text=None):
    """{subsection: [(names in the first cell, cells)]} of docs/reference.md."""
    text = REFERENCE.read_text() if text is None else text
    tables = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = next((name for name in SUBSECTIONS if line[3:].startswith(name)), None)
            assert current, f"docs/reference.md: unknown section {line!r} (known: {', '.join(SUBSECTIONS)})"
            assert current not in tables, f"docs/reference.md: two '## {current}' sections"
            tables[current] = []
        elif current and line.startswith("|"):
            tables[current].append(_cells(line))
    rows = {}
    for name, lines in tables.items():
        assert len(lines) >= 2 and set("".join(lines[1])) <= set("-:"), f"'## {name}': no Markdown table"
        rows[name] = [([span.split()[0] for span in _spans(cells[0])], cells) for cells in lines[2:]]
        for names, cells in rows[name]:
            assert names, f"'## {name}': a row without a `name` in its first cell: {cells}"
    return rows


def _names(rows):
    names = [name for row_names, _ in rows for name in row_names]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"rows listed twice: {duplicates}"
    return set(names)


def _one_name_per_row(what, rows):
    for names, cells in rows:
        assert len(names) == 1, f"docs/reference.md, {what}: one `name` per row, not {names}: {cells}"
    return [(names[0], cells) for names, cells in rows]


def _compare(what, documented, real):
    missing, stale = sorted(real - documented), sorted(documented - real)
    assert not missing and not stale, (
        f"docs/reference.md, {what}: missing rows {missing}; rows for what does not exist {stale}")


def default_spans(value):
    """How a default is written in the table's second cell."""
    if value is NO_DEFAULT:
        return []
    if isinstance(value, dict):
        return ["{}"] if not value else []
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value] if value else ["[]"]
    if value is None:
        return ["null"]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    return [str(value)]


def pillar_keys(data, prefix=""):
    """Colon paths of every key of DEFAULTS: a non-empty mapping's own keys
    follow it; an empty one (`profiles`, `sysctls`, `policy:keys`) holds names
    of the user's choosing."""
    for key, value in data.items():
        yield f"{prefix}{key}", value
        if isinstance(value, dict) and value:
            yield from pillar_keys(value, f"{prefix}{key}:")


def example_keys(data, defaults, prefix=""):
    """Colon paths of the keys pillar.example spells out, read like DEFAULTS;
    a profile's name becomes NAME, a kind of daemon's name under `limits`
    KIND (its fields are not walked into: `configs` holds data)."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if prefix == "limits:" and key not in defaults:
            yield "limits:KIND"
            yield from (f"limits:KIND:{field}" for field in (value or {}))
            continue
        yield path
        if path == "profiles":
            for body in value.values():
                yield from (f"profiles:NAME:{field}" for field in body)
        elif isinstance(value, dict) and isinstance(defaults.get(key), dict) and defaults[key]:
            yield from example_keys(value, defaults[key], f"{path}:")


EXPECTED_PILLAR = {path: value for path, value in pillar_keys(DEFAULTS)}
EXPECTED_PILLAR.update({f"profiles:NAME:{field}": NO_DEFAULT for field in PROFILE_FIELDS})
EXPECTED_PILLAR["limits:KIND"] = NO_DEFAULT
EXPECTED_PILLAR.update({f"limits:KIND:{field}": NO_DEFAULT for field in KIND_FIELDS + tuple(ALIASES)})


@pytest.fixture(scope="module")
def tables():
    return reference_tables()


def test_execution_and_state_functions_and_beacons_match_what_salt_call_lists(masterless, tables):
    synced = masterless.cli.run("--local", "saltutil.sync_all")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    masterless.synced = True
    beacons = {name.split(".", 1)[1] for name in synced.data["beacons"]}

    listed = masterless.run("sys.list_functions", "shadowsocks_tuning")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    functions = {name.split(".", 1)[1] for name in listed.data}
    assert "get" in functions, listed.data
    docs = masterless.run("sys.doc", "shadowsocks_tuning")
    assert docs.returncode == 0, docs.stdout + docs.stderr
    documented = {name.split(".", 1)[1]: doc for name, doc in docs.data.items() if "." in name}
    assert set(documented) == functions
    undocumented = sorted(name for name, doc in documented.items() if "CLI Example" not in (doc or ""))
    assert not undocumented, f"execution functions without a docstring holding 'CLI Example:': {undocumented}"

    states = masterless.run("sys.list_state_functions", "shadowsocks_tuning")
    assert states.returncode == 0, states.stdout + states.stderr
    state_functions = {name.split(".", 1)[1] for name in states.data}
    assert "tuned" in state_functions, states.data

    _compare("execution functions", _names(tables["Execution functions"]), functions)
    _compare("state functions", _names(tables["State functions"]), state_functions)
    if beacons or "Beacons" in tables:
        _compare("beacons", _names(tables.get("Beacons", [])), beacons)


def test_minion_options_match_options_with_their_defaults(tables):
    rows = tables["Minion options"]
    for names, _ in rows:
        assert all(name.startswith(OPTION_PREFIX) for name in names), f"write an option as {OPTION_PREFIX}NAME: {names}"
    _compare("minion options", {name[len(OPTION_PREFIX):] for name in _names(rows)}, set(OPTIONS))
    for name, cells in _one_name_per_row("minion options", rows):
        option = name[len(OPTION_PREFIX):]
        assert _spans(cells[1]) == default_spans(OPTIONS[option]), (
            f"docs/reference.md, minion option {name}: default written {_spans(cells[1])}, "
            f"OPTIONS has {default_spans(OPTIONS[option])}")


def test_pillar_keys_match_defaults_and_pillar_example_with_their_defaults(tables):
    rows = tables["Pillar keys"] + tables[KIND_SECTION]
    kind_rows = {names[0] for names, _ in tables[KIND_SECTION]}
    assert kind_rows == {key for key in EXPECTED_PILLAR if key.startswith("limits:KIND:")}, (
        f"docs/reference.md: '## {KIND_SECTION}' holds the fields of a kind, and only those: {sorted(kind_rows)}")
    _compare("pillar keys", _names(rows), set(EXPECTED_PILLAR))
    for key, cells in _one_name_per_row("pillar keys", rows):
        assert _spans(cells[1]) == default_spans(EXPECTED_PILLAR[key]), (
            f"docs/reference.md, pillar key {key}: default written {_spans(cells[1])}, "
            f"DEFAULTS has {default_spans(EXPECTED_PILLAR[key])}")
    # pillar.example spells out every key of DEFAULTS, and nothing else.
    example = yaml.safe_load((REPO / "pillar.example").read_text())["shadowsocks"]["tuning"]
    in_example = set(example_keys(example, DEFAULTS))
    missing = sorted(set(dict(pillar_keys(DEFAULTS))) - in_example)
    unknown = sorted(in_example - set(EXPECTED_PILLAR))
    assert not missing and not unknown, f"pillar.example: keys missing {missing}; keys that do not exist {unknown}"
    # Kinds are shown with examples of the registry's own, whose field names it knows.
    shown = [kind for kind in example["limits"] if kind not in DEFAULTS["limits"]]
    assert len(shown) >= 2 and set(shown) <= set(KINDS), f"pillar.example: kinds shown {shown}, known {sorted(KINDS)}"


def test_the_parser_reads_escaped_pipes_several_names_and_signatures():
    text = (
        "# Reference\n\n## Execution functions: x\n\n| function | what |\n|---|---|\n"
        "| `container [format=compose\\|docker]` | a \\| b |\n| `profile [NAME]`, `profiles` | c |\n"
        "\n## Beacons\n\n| beacon | what |\n|---|---|\n| `b` | d |\n"
    )
    tables = reference_tables(text)
    rows = tables["Execution functions"]
    assert [names for names, _ in rows] == [["container"], ["profile", "profiles"]]
    assert rows[0][1] == ["`container [format=compose|docker]`", "a | b"]
    assert [names for names, _ in tables["Beacons"]] == [["b"]]
    with pytest.raises(AssertionError, match="unknown section"):
        reference_tables("## Something else\n| `x` | |\n")


# --------------------------------------------------------------------------
# Links between the pages
# --------------------------------------------------------------------------
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped
    (backticks, colons, dots, slashes), blanks as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = _FENCE.sub("", path.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def links(path):
    """(target, anchor) of every link to a file of this repository, outside code."""
    text = _CODE.sub("", _FENCE.sub("", path.read_text()))
    for match in _LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        yield file_part, anchor


def test_every_link_between_the_pages_resolves():
    problems = []
    for page in PAGES:
        for file_part, anchor in links(page):
            target = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(REPO)}: link ({file_part}{'#' + anchor if anchor else ''})"
            if not target.exists():
                problems.append(f"{where}: no such file")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                problems.append(f"{where}: no heading with that anchor in {target.relative_to(REPO)}")
    assert not problems, "\n".join(problems)


def test_the_readme_links_every_page_of_docs():
    linked = {(REPO / file_part).resolve() for file_part, _ in links(REPO / "README.md") if file_part}
    orphans = sorted(str(p.relative_to(REPO)) for p in PAGES[1:] if p.resolve() not in linked)
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_the_link_checker_sees_a_broken_link_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Open-file limits: `nofile`\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#open-file-limits-nofile) [gone](c.md) [no anchor](a.md#nope) "
                    "[web](https://example.org/x.md) `[in a code span](e.md)`\n```\n[in code](d.md)\n```\n")
    found = list(links(page))
    assert found == [("a.md", "open-file-limits-nofile"), ("c.md", ""), ("a.md", "nope")]
    assert "open-file-limits-nofile" in anchors(tmp_path / "a.md") and "nope" not in anchors(tmp_path / "a.md")
