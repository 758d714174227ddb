"""
The configs of today's shadowsocks servers, read for one thing: the ports
they listen on, so that ``net.ipv4.ip_local_reserved_ports`` can keep
outbound connections off them. Owns the readers of the config formats those
servers use (strict JSON; JSON5, with ``#`` comments for Xray, v2ray and
sing-box; YAML), a small field-path language that says which fields hold
ports, and the scan of config files. Reads files only, never writes.

A config is not ours to judge: one that is missing, not a regular file, too
large or unparsable is skipped (its own daemon fails on it), and a field
that does not hold a port is ignored.
"""

import functools
import glob
import json
import os
import re
import unicodedata

import yaml

import sstuning_journal as journal

MAX_BYTES = 1 << 20  # far over any real config (shadowsocks-libev refuses 128 KiB: MAX_CONF_SIZE)
MAX_DEPTH = 256  # real configs nest about ten deep; past this, refuse instead of recursing
MAX_RANGE = 1024  # ports taken from one value such as "10000-65000"
MAX_YAML_VALUES = 1_000_000  # what a YAML document may expand to through aliases
FORMATS = ("json", "json5", "jsonc", "yaml")

# ---------------------------------------------------------------------------
# JSON5 (https://spec.json5.org, 1.0.0): a token regex, tried at one place at
# a time by re's scanner, and an iterative parser over its tokens (no
# recursion, so nesting costs no stack). Each token swallows the whitespace
# and comments before it; ``match.lastindex``, the last group that matched,
# says which token it is (and whether a ':' or ',' came with it).
# ---------------------------------------------------------------------------
# WhiteSpace: TAB VT FF SP NBSP BOM and the Zs category; LineTerminator: LF CR LS PS.
_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_LINE_END = "\n\r\u2028\u2029"
_BLOCK_COMMENT = r"/\*[^*]*\*+(?:[^/*][^*]*\*+)*/"


def _skip_regex(line_comment, comment_start):
    # Plain blanks first; the group for the rest is entered only where one of
    # them can start (the lookahead): entering that group costs re four times
    # what the rest of a token does.
    # A line comment runs to the end of its line: the lookahead keeps re from
    # backtracking into it ("null//:" is null and a comment, not a name and
    # a colon). A block comment can only end at its first "*/".
    rest = rf"(?:[{_SPACE}]+|{line_comment}[^{_LINE_END}]*(?=[{_LINE_END}]|\Z)|{_BLOCK_COMMENT})"
    starts = r"\v\f\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff" + comment_start
    return rf"[ \t\n\r]*(?:(?=[{starts}]){rest}[ \t\n\r]*)*"


def _token_regex(line_comment, comment_start):
    skip = _skip_regex(line_comment, comment_start)
    word_char = r"[\w$\u200c\u200d]|[^\x00-\x7f\s\ufeff]|\\u[0-9A-Fa-f]{4}"
    tokens = (
        r"(\{)", r"(\})", r"(\[)", r"(\])", r"(:)", r"(,)",
        # The common tokens take the ':' or ',' after them in the same match
        # (a third fewer matches); match.lastindex then names the pair.
        rf'"([^"\\\n\r]*)"(?:{skip}(?:(:)|(,)))?',  # a string without escapes: its text is its value
        rf"([A-Za-z_$][A-Za-z0-9_$]*){skip}:",  # a plain member name and its colon
        rf"'([^'\\\n\r]*)'(?:{skip}(,))?",
        r'"((?:[^"\\\n\r]|\\(?:\r\n|[\s\S]))*)"', r"'((?:[^'\\\n\r]|\\(?:\r\n|[\s\S]))*)'",
        r"([+-]?(?:Infinity|NaN|0[xX][0-9A-Fa-f]+|(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)"
        # Not followed by what could go on an identifier ("Infinity\u0301" is a name).
        rf"(?:[eE][+-]?[0-9]+)?)(?!{word_char}))(?:{skip}(,))?",
        rf"(null|true|false){skip}(,)",
        rf"((?:{word_char})+)",  # an identifier, checked exactly by _identifier
        r"(\Z)",
    )
    return re.compile(skip + "(?:" + "|".join(tokens) + ")")


# Tokens by match.lastindex; VALUE_THEN_COMMA kinds are a value and the comma after it.
(_OPEN_OBJ, _CLOSE_OBJ, _OPEN_LIST, _CLOSE_LIST, _COLON, _COMMA, _STRING_DQ, _KEY_STRING, _STRING_DQ_COMMA,
 _KEY_WORD, _STRING_SQ, _STRING_SQ_COMMA, _ESCAPED_DQ, _ESCAPED_SQ, _NUMBER, _NUMBER_COMMA, _LITERAL,
 _LITERAL_COMMA, _WORD, _END) = range(1, 21)
_PLAIN = {_STRING_DQ: (_STRING_DQ, False), _STRING_DQ_COMMA: (_STRING_DQ, True),
          _STRING_SQ: (_STRING_SQ, False), _STRING_SQ_COMMA: (_STRING_SQ, True)}
_COMMENTS = {"json5": ("//", "/"), "jsonc": ("(?://|#)", "/#")}  # the line comment; what any comment starts with


# Compiled at the first config read, not at import: compiling them costs
# about 10 ms, paid on every salt-call that loads this file, and most boxes
# have no config to parse.
@functools.lru_cache(maxsize=None)
def _tokens(fmt):
    return _token_regex(*_COMMENTS[fmt])


@functools.lru_cache(maxsize=None)
def _skip(fmt):
    return re.compile(_skip_regex(*_COMMENTS[fmt]))

_ESCAPE = re.compile(
    r"\\(?:u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2})|(\r\n|[\n\r\u2028\u2029])|(0(?![0-9])|[^0-9xu])|([\s\S]?))"
)
_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SINGLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "0": "\0"}
_WORDS = {"null": None, "true": True, "false": False}  # Infinity and NaN are number tokens
_INFINITIES = (float("inf"), float("-inf"))
_ID_START = frozenset(("Lu", "Ll", "Lt", "Lm", "Lo", "Nl"))
_ID_PART = _ID_START | {"Mn", "Mc", "Nd", "Pc"}
_EXPECTED = {"value": "a value", "key": "a member name or '}'", "colon": "':'",
             "list": "a value or ']'", "end": "the end of the text"}


def _position(text, offset):
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _error(text, offset, message):
    line, column = _position(text, offset)
    return ValueError(f"line {line} column {column}: {message}")


def _found(text, offset):
    return repr(text[offset:offset + 12]) if offset < len(text) else "the end of the text"


def _no_token(text, fmt, offset):
    """Why no token starts at ``offset`` (after its whitespace and comments)."""
    offset = _skip(fmt).match(text, offset).end()
    rest = text[offset:offset + 2]
    if rest[:1] in ("'", '"'):
        return _error(text, offset, "a string that does not end on its line (a line break inside a string "
                                    "must be escaped)")
    if rest == "/*":
        return _error(text, offset, "a '/*' comment that never ends with '*/'")
    return _error(text, offset, f"unexpected {_found(text, offset)}")


def _unescape(text, start, body):
    """The value of a JSON5 string body that holds backslashes; ``start`` is
    where the body begins in ``text``, for errors."""

    def replace(match):
        code, byte, _, simple, bad = match.groups()
        if code:
            return chr(int(code, 16))
        if byte:
            return chr(int(byte, 16))
        if simple:
            return _SINGLE_ESCAPES.get(simple, simple)
        if bad is not None:
            raise _error(text, start + match.start(), f"invalid escape {match.group(0)!r} in a string")
        return ""  # a line continuation

    value = _ESCAPE.sub(replace, body)
    # A \uXXXX escape is one UTF-16 unit: two that make a pair (even with a
    # line continuation between them) are one character, as in JavaScript.
    return _PAIR.sub(_join_pair, value) if "\\u" in body else value


def _join_pair(match):
    high, low = match.group(0)
    return chr(0x10000 + ((ord(high) - 0xD800) << 10) + ord(low) - 0xDC00)


def _identifier_escape(match):
    """An identifier takes only \\uXXXX escapes, each one a character of the
    name (json5's reference reader checks each alone, so a surrogate pair is
    refused); anything else becomes a backslash, which no name may hold."""
    return chr(int(match.group(1), 16)) if match.group(1) else "\\"


def _identifier(text, start, word):
    """A member name written as an identifier, checked against ES5's
    IdentifierName (JSON5 names are those); ``\\uXXXX`` escapes decoded."""
    if word.isascii() and "\\" not in word and not word[0].isdigit():
        return word
    name = _ESCAPE.sub(_identifier_escape, word)
    for index, char in enumerate(name):
        ok = char in "$_" or unicodedata.category(char) in (_ID_START if index == 0 else _ID_PART) \
            or (index and char in "\u200c\u200d")
        if not ok:
            raise _error(text, start, f"{word!r} is not a valid member name (quote it)")
    return name


def _number(token):
    try:
        return int(token)
    except ValueError:
        pass
    if "x" in token or "X" in token:
        return int(token, 16)
    return float(token)  # Python reads "5.", ".5", "Infinity" and "NaN" the way JSON5 means them


def _json5(text, fmt="json5", constants=True):
    """The value of a JSON5 text; ``constants=False`` refuses NaN and
    Infinity (to place strict JSON's error on them)."""
    match = _tokens(fmt).scanner(text).match
    stack = []  # the open containers, innermost last
    state = "value"
    key = None
    root = None
    end = 0
    while True:
        token = match()
        if token is None:
            raise _no_token(text, fmt, end)
        kind = token.lastindex
        end = token.end()
        if state == "key":
            if kind == _KEY_STRING:
                key, state = token.group(_STRING_DQ), "value"
            elif kind == _KEY_WORD:
                key, state = token.group(kind), "value"
            elif kind == _STRING_DQ or kind == _STRING_SQ:
                key, state = token.group(kind), "colon"
            elif kind == _ESCAPED_DQ or kind == _ESCAPED_SQ:
                key, state = _unescape(text, token.start(kind), token.group(kind)), "colon"
            elif kind == _WORD:
                key, state = _identifier(text, token.start(kind), token.group(kind)), "colon"
            elif kind == _CLOSE_OBJ:
                stack.pop()
                state = "after" if stack else "end"
            else:
                start = _start(text, fmt, token)
                raise _error(text, start, f"expected {_EXPECTED[state]}, found {_found(text, start)}")
            continue
        if state == "value" or state == "list":
            comma = False
            if kind in _PLAIN:
                group, comma = _PLAIN[kind]
                value = token.group(group)
            elif kind == _NUMBER or kind == _NUMBER_COMMA:
                value, comma = _number(token.group(_NUMBER)), kind == _NUMBER_COMMA
                if not constants and (value != value or value in _INFINITIES):
                    raise _error(text, token.start(_NUMBER), f"{token.group(_NUMBER)} is not JSON")
            elif kind == _LITERAL_COMMA:
                value, comma = _WORDS[token.group(_LITERAL)], True
            elif kind == _OPEN_OBJ or kind == _OPEN_LIST:
                if len(stack) >= MAX_DEPTH:
                    raise _error(text, token.start(kind), f"nested deeper than {MAX_DEPTH} levels")
                value = {} if kind == _OPEN_OBJ else []
                if stack:
                    parent = stack[-1]
                    if type(parent) is list:
                        parent.append(value)
                    else:
                        parent[key] = value
                else:
                    root = value
                stack.append(value)
                state = "key" if kind == _OPEN_OBJ else "list"
                continue
            elif kind == _ESCAPED_DQ or kind == _ESCAPED_SQ:
                value = _unescape(text, token.start(kind), token.group(kind))
            elif kind == _WORD and token.group(kind) in _WORDS:
                value = _WORDS[token.group(kind)]
            elif kind == _CLOSE_LIST and state == "list":  # "[]", or a trailing comma
                stack.pop()
                state = "after" if stack else "end"
                continue
            else:
                start = _start(text, fmt, token)
                raise _error(text, start, f"expected {_EXPECTED[state]}, found {_found(text, start)}")
            if not stack:
                if comma:  # the comma is where this text should have ended
                    start = token.start(kind)
                    raise _error(text, start, f"expected {_EXPECTED['end']}, found {_found(text, start)}")
                root, state = value, "end"
                continue
            parent = stack[-1]
            if type(parent) is list:
                parent.append(value)
                state = "list" if comma else "after"
            else:
                parent[key] = value
                state = "key" if comma else "after"
            continue
        if state == "after":
            inner = stack[-1]
            if kind == _COMMA:
                state = "list" if type(inner) is list else "key"
                continue
            if kind == (_CLOSE_LIST if type(inner) is list else _CLOSE_OBJ):
                stack.pop()
                state = "after" if stack else "end"
                continue
            closing = "']'" if type(inner) is list else "'}'"
            start = _start(text, fmt, token)
            raise _error(text, start, f"expected ',' or {closing}, found {_found(text, start)}")
        if state == "colon" and kind == _COLON:
            state = "value"
            continue
        if state == "end" and kind == _END:
            return root
        start = _start(text, fmt, token)
        raise _error(text, start, f"expected {_EXPECTED[state]}, found {_found(text, start)}")


def _start(text, fmt, token):
    """Where a token begins, after the whitespace and comments it swallowed."""
    return _skip(fmt).match(text, token.start()).end()


# ---------------------------------------------------------------------------
# Strict JSON and YAML, through the standard readers, errors made to match.
# ---------------------------------------------------------------------------
def _reject_constant(name):
    raise _Constant(name)


class _Constant(Exception):
    """NaN or Infinity in a strict JSON text (Python's json accepts them)."""


def _json(text):
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (_Constant, RecursionError):
        pass
    # Python's json accepts NaN and nests as deep as the stack goes: read the
    # text again the JSON5 way, which places the error (JSON is JSON5).
    _json5(text, constants=False)
    raise ValueError("line 1 column 1: nested too deep")  # not reached: JSON5 refuses past MAX_DEPTH


_TAG = "tag:yaml.org,2002:"
_YAML_TAGS = frozenset(_TAG + name for name in ("str", "int", "float", "bool", "null", "seq", "map", "merge"))


def _yaml_loader(base):
    """safe_load's loader (``base``), but a date stays the text it is (a
    config names ports, not days); _check_yaml refuses the tags that are
    not JSON-like (``!!binary``, ``!!set``, ``!!omap``, ``!!timestamp`` ...)."""
    resolvers = {first: [(tag, regex) for tag, regex in pairs if tag != _TAG + "timestamp"]
                 for first, pairs in base.yaml_implicit_resolvers.items()}
    return type("_YamlLoader", (base,), {"yaml_implicit_resolvers": resolvers})


# libyaml when PyYAML has it (its wheels bundle it; this venv has it): 5-10x faster.
_YamlLoader = _yaml_loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _yaml_error(exc, text):
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "not YAML"
        return ValueError(f"line {mark.line + 1} column {mark.column + 1}: {problem}")
    if isinstance(exc, yaml.reader.ReaderError):
        character = chr(exc.character) if isinstance(exc.character, int) else exc.character  # libyaml: a number
        return _error(text, exc.position, f"character {character!r} is not allowed in YAML")
    return ValueError(f"line 1 column 1: {exc}")


def _check_yaml(node):
    """Refuse what is not mappings, lists and scalars, deeper than
    MAX_DEPTH, an alias that contains itself, or aliases that expand past
    MAX_YAML_VALUES; each node is visited once however often it is aliased."""
    sizes = {}  # id(node) -> its size once expanded; a node on the path has None
    stack = [(node, iter(_yaml_children(node)))]
    sizes[id(node)] = None
    while stack:
        current, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            sizes[id(current)] = 1 + sum(sizes[id(c)] for c in _yaml_children(current))
            if sizes[id(current)] > MAX_YAML_VALUES:
                raise _mark_error(current, f"expands through aliases to more than {MAX_YAML_VALUES} values")
            continue
        if id(child) in sizes:
            if sizes[id(child)] is None:
                raise _mark_error(child, "an alias to a node that contains it")
            continue
        if child.tag not in _YAML_TAGS:
            raise _mark_error(child, f"{child.tag!r} values are not read (only mappings, lists and scalars)")
        if len(stack) >= MAX_DEPTH:
            raise _mark_error(child, f"nested deeper than {MAX_DEPTH} levels")
        sizes[id(child)] = None
        stack.append((child, iter(_yaml_children(child))))


def _yaml_children(node):
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return ()


def _mark_error(node, message):
    return ValueError(f"line {node.start_mark.line + 1} column {node.start_mark.column + 1}: {message}")


def _yaml(text):
    try:
        loader = _YamlLoader(text)
    except UnicodeEncodeError as exc:  # libyaml takes UTF-8: bytes that were not UTF-8 cannot go in
        raise _error(text, exc.start, "bytes that are not UTF-8") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if node.tag not in _YAML_TAGS:
            raise _mark_error(node, f"{node.tag!r} values are not read (only mappings, lists and scalars)")
        _check_yaml(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text) from None
    except RecursionError:  # only the pure-Python composer recurses, and only without libyaml
        raise ValueError(f"line 1 column 1: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def loads(text, fmt):
    """The value of ``text`` in ``fmt``: ``json`` (strict RFC 8259: no
    comments, no NaN), ``json5`` (shadowsocks-rust reads its configs with
    the json5 crate), ``jsonc`` (JSON5 plus ``#`` line comments: Xray, v2ray
    and sing-box strip ``//``, ``/* */`` and ``#`` comments before reading
    JSON, so their configs read here even where their own reader is
    stricter) or ``yaml`` (outline-ss-server). Only mappings, lists,
    strings, numbers, booleans and null come back. Raises ValueError
    naming the line and column."""
    if fmt == "json":
        return _json(text)
    if fmt == "json5" or fmt == "jsonc":
        try:
            # JSON is JSON5, and most of these configs are plain JSON: Python's
            # C reader takes a tenth of the time. It also nests deeper than
            # MAX_DEPTH, which only means that more is read.
            return json.loads(text)
        except (ValueError, RecursionError):
            return _json5(text, fmt)
    if fmt == "yaml":
        return _yaml(text)
    raise ValueError(f"config format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------
# Which fields hold ports: data, not code. A field is dot-separated steps:
#   name            the value of a key       (server_port, manager_address)
#   name[]          each item of a list      (servers[].server_port)
#   name[k=v]       each item whose k is v   (inbounds[protocol=shadowsocks].port)
#   *               the keys of a mapping, last step only (port_password.*)
# A mapping where a list is expected counts as a list of one (v2ray's old
# single "inbound"). v is compared without case: Xray and v2ray lower-case
# the protocol before looking it up (JSONConfigLoader.LoadWithID).
# ---------------------------------------------------------------------------
_GLOB_MAGIC = re.compile(r"[*?[]")
_STEP = re.compile(r"([A-Za-z0-9_$-]+)(?:\[(?:([A-Za-z0-9_$-]+)=([^\]\[.]+))?\])?\Z")
# A port, "host:port", "[::]:port", "tcp://[::]:9000", or v2ray's and Xray's
# port lists "10000-10010" and "80,443,1000-2000".
_PORT_TEXT = re.compile(
    r"(?:[A-Za-z][A-Za-z0-9+.-]*://)?(?:(?:\[[^\[\]]*\]|[^\s:/\[\]]*):)?"
    r"([0-9]{1,5}(?:-[0-9]{1,5})?(?:,[0-9]{1,5}(?:-[0-9]{1,5})?)*)\Z"
)


def _steps(field):
    """``field`` as steps: ("key", name), ("each", name, filter or None), ("keys",)."""
    if not isinstance(field, str):
        raise ValueError(f"port field {field!r} is not a string such as 'servers[].server_port'")
    return _parse_steps(field)


@functools.lru_cache(maxsize=256)
def _parse_steps(field):
    steps = []
    parts = field.split(".")
    for index, part in enumerate(parts):
        if part == "*" and index == len(parts) - 1 and index:
            steps.append(("keys",))
            continue
        match = _STEP.match(part)
        if not match:
            raise ValueError(
                f"port field {field!r}: {part!r} is not a step; write name, name[], name[key=value], "
                "or '*' last (the keys of a mapping), joined by dots"
            )
        name, key, value = match.groups()
        if part.endswith("]"):
            steps.append(("each", name, (key, value.lower()) if key else None))
        else:
            steps.append(("key", name))
    return tuple(steps)


def _values(data, steps):
    current = [data]
    for step in steps:
        found = []
        for node in current:
            if not isinstance(node, dict):
                continue
            if step[0] == "keys":
                found.extend(node)
                continue
            if step[1] not in node:
                continue
            value = node[step[1]]
            if step[0] == "key":
                found.append(value)
                continue
            items = value if isinstance(value, list) else [value] if isinstance(value, dict) else ()
            condition = step[2]
            if condition is None:
                found.extend(items)
            else:
                key, wanted = condition
                found.extend(item for item in items if isinstance(item, dict) and isinstance(item.get(key), str)
                             and item[key].lower() == wanted)
        current = found
    return current


def _ports_of(value):
    """[(port, note)] for one value; [] for anything that is not a port. A
    range gives at most MAX_RANGE ports, and its note says when it gave fewer."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [(value, "")] if 0 < value <= 65535 else []
    if not isinstance(value, str):
        return []
    match = _PORT_TEXT.match(value)
    if not match:
        return []
    found = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        low, high = int(low), int(high or low)
        room = MAX_RANGE - len(found)
        if not 0 < low <= high <= 65535 or room <= 0:
            continue
        note = ""
        if high - low + 1 > room:
            note = f", range {part} capped at its first {room} ports"
            high = low + room - 1
        found.extend((port, note) for port in range(low, high + 1))
    return found


def ports(data, fields):
    """{port: field} for every port the ``fields`` of ``data`` hold, the
    first field to name a port kept."""
    found = {}
    for field in fields:
        for value in _values(data, _steps(field)):
            for port, note in _ports_of(value):
                if port not in found:
                    found[port] = field + note
    return found


def _paths(paths_or_globs):
    if isinstance(paths_or_globs, str):
        paths_or_globs = [paths_or_globs]
    seen = set()
    for pattern in paths_or_globs:
        # A missing directory costs one failed scandir; glob compiles a pattern once.
        for path in sorted(glob.glob(pattern)) if _GLOB_MAGIC.search(pattern) else [pattern]:
            if path not in seen:
                seen.add(path)
                yield path


def _read(paths_or_globs, fmt, skipped):
    """(path, data) of every config file that ``paths_or_globs`` name (a glob
    such as ``/etc/shadowsocks-libev/*.json`` expands sorted), read as
    ``fmt``. A file is read through a symbolic link, but one that is
    missing, not a regular file (a directory, a named pipe: never waited
    on), over MAX_BYTES or unparsable is skipped; ``skipped``, a list, gets
    a line saying why for each."""
    if fmt not in FORMATS:
        raise ValueError(f"config format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    for path in _paths(paths_or_globs):
        try:
            text = journal.read_text(path, max_bytes=MAX_BYTES)
            if text is None:  # not installed: nothing to say, unless a link points nowhere
                if skipped is not None and os.path.islink(path):
                    skipped.append(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist")
                continue
            data = loads(text, fmt)
        except (OSError, ValueError, journal.NotRegularFile) as exc:
            if skipped is not None:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                skipped.append(reason if reason.startswith(path) else f"{path}: {reason}")
            continue
        yield path, data


def config_ports(paths_or_globs, fmt, fields, skipped=None):
    """{port: "path (field)"} from the config files ``paths_or_globs`` name
    (read as ``_read`` says)."""
    for field in fields:
        _steps(field)  # a bad field is the caller's mistake, not the config's: raise it
    found = {}
    for path, data in _read(paths_or_globs, fmt, skipped):
        for port, field in ports(data, fields).items():
            found.setdefault(port, f"{path} ({field})")
    return found


def config_values(paths_or_globs, fmt, field, skipped=None):
    """[(path, value)] of ``field`` (a key such as ``nofile``, or a field
    path) in each config file ``paths_or_globs`` name that has it."""
    steps = _steps(field)
    return [(path, value) for path, data in _read(paths_or_globs, fmt, skipped) for value in _values(data, steps)]
