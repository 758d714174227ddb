"""Properties of the config readers (hypothesis): any JSON text reads back
as the value it encodes, through Python's json and through the hand-written
JSON5 parser alike; JSON5 decorations (comments, trailing commas, quotes,
bare names, hex, signs, line continuations) change no value; and any text
at all, in any format, either reads or raises ValueError, never anything
else. Inputs are bounded in size; the parsers' cost is linear in it (regexes
without nested repetition, no recursion), measured in bench/, not asserted."""

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sstuning_configs as configs
import sstuning_daemons as daemons

# The format and port fields per kind of server, from the daemon registry,
# under the servers' own names.
SHAPES = {server: (daemons.KINDS[kind]["configs"]["format"], daemons.KINDS[kind]["configs"]["ports"])
          for server, kind in (("shadowsocks-libev", "shadowsocks_libev"), ("shadowsocks-rust", "shadowsocks_rust"),
                               ("outline-ss-server", "outline"), ("xray", "xray"), ("v2ray", "v2ray"),
                               ("sing-box", "sing_box"))}

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMATS = ("json", "json5", "jsonc", "yaml")
IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*\Z")

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=40,
)
# Comment texts that hold what a careless reader would take for the end of
# a string or of a comment.
comment_text = st.lists(st.sampled_from(list("ab \"'/*#\\{}[],:") + ["//", "/*", "\u2028"]), max_size=12).map("".join)


@FUZZ
@given(values, st.booleans(), st.sampled_from([None, 0, 2, "\t"]))
def test_any_json_text_reads_back(value, ascii_only, indent):
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    assert configs._json5(text) == value  # the hand-written parser, not the json fast path
    assert configs._json5(text, "jsonc") == value
    assert configs.loads(text, "json5") == value
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:  # an infinity: JSON5, not JSON
        return
    assert configs.loads(text, "json") == value


def _gap(draw, fmt):
    """Whitespace and comments, as JSON5 (or jsonc) allows between tokens."""
    parts = []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["space", "line", "block", "hash"] if fmt == "jsonc" else ["space", "line", "block"]))
        if kind == "space":
            parts.append(draw(st.text(alphabet=st.sampled_from(list(" \t\n\r\v\f\u00a0\u2028\u2029\ufeff\u3000")),
                                      min_size=1, max_size=3)))
        elif kind == "block":
            parts.append("/*" + draw(comment_text).replace("*/", "* /") + "*/")
        else:
            body = re.sub("[\n\r\u2028\u2029]", " ", draw(comment_text))
            parts.append(("//" if kind == "line" else "#") + body + "\n")
    return "".join(parts)


UNIT = re.compile(r"\\u[0-9a-fA-F]{4}|\\.|.", re.S)  # one character or one escape of a JSON string body


def _string(draw, text):
    """``text`` as a JSON5 string: either quote, and maybe a line
    continuation between two characters."""
    units = UNIT.findall(json.dumps(text, ensure_ascii=draw(st.booleans()))[1:-1])
    quote = draw(st.sampled_from(['"', "'"]))
    if quote == "'":
        units = ['"' if unit == '\\"' else "\\'" if unit == "'" else unit for unit in units]
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(units)))
        units.insert(cut, "\\" + draw(st.sampled_from(["\n", "\r\n", "\r", "\u2028", "\u2029"])))
    return quote + "".join(units) + quote


def _render(draw, value, fmt):
    gap = lambda: _gap(draw, fmt)  # noqa: E731
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        style = draw(st.sampled_from(["decimal", "hex", "plus"]))
        if style == "hex":
            return ("-" if value < 0 else draw(st.sampled_from(["", "+"]))) + draw(st.sampled_from(["0x", "0X"])) \
                + format(abs(value), draw(st.sampled_from(["x", "X"])))
        return ("+" if style == "plus" and value >= 0 else "") + str(value)
    if isinstance(value, float):
        text = json.dumps(value)
        if value.is_integer() and abs(value) < 1e15 and draw(st.booleans()):
            text = f"{int(value)}." if value or str(value)[0] != "-" else "-0."
        return ("+" if value >= 0 and not text.startswith("-") and draw(st.booleans()) else "") + text
    if isinstance(value, str):
        return _string(draw, value)
    if isinstance(value, list):
        items = [gap() + _render(draw, item, fmt) + gap() for item in value]
        trailing = "," if items and draw(st.booleans()) else ""
        return "[" + ",".join(items) + trailing + gap() + "]"
    members = []
    for key, item in value.items():
        name = key if IDENTIFIER.match(key) and draw(st.booleans()) else _string(draw, key)
        members.append(gap() + name + gap() + ":" + gap() + _render(draw, item, fmt) + gap())
    trailing = "," if members and draw(st.booleans()) else ""
    return "{" + ",".join(members) + trailing + gap() + "}"


@FUZZ
@given(values, st.sampled_from(["json5", "jsonc"]), st.data())
def test_json5_decorations_change_no_value(value, fmt, data):
    text = _gap(data.draw, fmt) + _render(data.draw, value, fmt) + _gap(data.draw, fmt)
    assert configs.loads(text, fmt) == value, text


# Text made of JSON5's and YAML's own pieces, to reach past the first character.
text_of_tokens = st.lists(st.sampled_from(
    list("{}[]:,\"'\\/*#\n\r \t0123456789abefnrtuxyINaT+-.eE$_&!?|>") + [
        "\u2028", "\ufeff", "\udcff", "null", "true", "0x", "Infinity", "//", "/*", "*/", "- ", ": ", "!!", "*a", "&a"]),
    max_size=150).map("".join)


@FUZZ
@given(st.one_of(st.text(max_size=300), text_of_tokens), st.sampled_from(FORMATS))
def test_any_text_reads_or_raises_value_error(text, fmt):
    try:
        value = configs.loads(text, fmt)
    except ValueError as exc:
        assert re.match(r"line \d+ column \d+: ", str(exc)), str(exc)
        return
    for fields in (shape[1] for shape in SHAPES.values()):
        assert all(0 < port <= 65535 for port in configs.ports(value, fields))


@FUZZ
@given(values, st.sampled_from(sorted(SHAPES)))
def test_ports_never_fail_on_any_data(value, kind):
    data = {"server_port": value, "servers": [value, {"port": value}], "inbounds": value,
            "keys": [{"port": value}], "port_password": value if isinstance(value, dict) else {}}
    found = configs.ports(data, SHAPES[kind][1])
    assert all(isinstance(port, int) and 0 < port <= 65535 for port in found)
