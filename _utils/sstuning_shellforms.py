"""
The lines of a shell file that set what this package manages: ``ulimit -n``
(the open-file limit) and ``KEY=value`` (``MAXFD`` for shadowsocks-libev).
``Reader`` keeps those that run as plain lines at the file's top level, in a
form a renderer can rewrite, and refuses, naming ``path:line`` and what to do,
any other form: inside a compound command, a function or a subshell, on a
continued line, with a value from an expansion, sharing its line, or a form
dash and bash read differently. Here-document text is no command and is not
read. Built on ``sstuning_shell.scan``; text in, facts out.
"""

import re

from salt.exceptions import CommandExecutionError

import sstuning_shell as shell

_ASSIGNMENT_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
TOP_LEVEL_HINT = "at the top level of the file (outside if/case/loops/functions/subshells)"
# A line of its own (the text of the line without its "\n"; a CR before it is
# kept, as dash reads it: part of the last word).
ULIMIT_LINE = re.compile(
    r"^(?P<indent>[ \t]*)ulimit(?P<flags>(?:[ \t]+-[A-Za-z]+)+)[ \t]+(?P<value>[0-9]+|unlimited)"
    r"(?P<tail>[ \t]+#.*|[ \t]*\r?)$"
)
_ULIMIT_LOOKS = re.compile(r"(?:^|[\s;&|({`])ulimit\b[^#\n]*[ \t]-[A-Za-z]*n")
_LINE_HINT = "a plain `ulimit -n N` line of its own (N a number or `unlimited`, optionally followed by a # comment)"


def _assignment_line(key):
    return re.compile(
        r"^(?P<indent>[ \t]*)(?P<export>export[ \t]+)?" + re.escape(key)
        + r"=(?P<value>\"[^\"$`\\\n]*\"|'[^'\n]*'|[A-Za-z0-9_./:@%+,=-]*)(?P<tail>[ \t]+#.*|[ \t]*)(?P<cr>\r?)$"
    )


def _ulimit_sets_nofile(args):
    """Whether `ulimit ARGS` sets the open-file limit: True, False (another
    limit, or a query: `ulimit -n` prints it), or None when an expansion in
    option position hides which limit it is. An `-n` after a value counts
    too: dash stops reading options there (too many arguments), bash sets
    every limit named."""
    letters, value = "", False
    for word in args:
        if word.plain is None:
            if not value and not re.sub(r"[SHa]", "", letters):
                return None
            value = True
        elif word.plain.startswith("-") and len(word.plain) > 1 and word.plain != "--":
            letters += word.plain[1:]
        else:
            value = True
    return "n" in letters and value


def _why_frames(frames):
    return " in ".join(f"{label} (line {line})" if "(line" not in label else label for label, line in reversed(frames))


class Reader:
    """The managed lines of one shell text, or a refusal. ``lines``: the
    text's lines (without "\\n"); ``ulimits``: [{line, indent, tail, which,
    value}] (which: "S", "H" or "SH"; value: int or "unlimited"; None when
    the line fails in dash, a CR left in its value); ``assignments``:
    [{line, indent, export, quote, value, tail}] for ``key``."""

    def __init__(self, text, path, key=None):
        self.path = path
        self.key = key
        self.text = text or ""
        self.lines = self.text.split("\n")
        if self.lines and self.lines[-1] == "":
            self.lines.pop()
        self.scan = shell.scan(self.text, path)
        self.ulimits, self.assignments = [], []
        self._assignment = _assignment_line(key) if key else None
        starts = set()
        for command in self.scan.commands:
            kind = self._kind(command)
            if kind:
                starts.add(command.line)
                self._accept(command, kind)
        self._refuse_continued(starts)
        if key:
            self._refuse_other_writes()

    def _refuse(self, line, why):
        body = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        raise CommandExecutionError(f"{self.path}:{line}: {body.strip()!r} {why}")

    def _what(self, kind):
        return _LINE_HINT if kind == "ulimit" else f"a plain `{self.key}=VALUE` line of its own"

    def _kind(self, command):
        """"ulimit" or "assignment" when the command sets what this reader
        manages (refusing the forms that set it in a way it cannot edit)."""
        words, key = command.words, self.key
        index = 0
        while index < len(words) and _ASSIGNMENT_WORD.match(words[index].raw):
            index += 1
        prefix, rest = words[:index], words[index:]
        name = rest[0].plain if rest else None
        if key and any(word.raw.startswith(f"{key}=") for word in prefix):
            if rest:
                self._refuse(command.line, f"sets {key} only for the command {rest[0].raw!r} (or, before a special "
                                           f"builtin, for good): write {self._what('assignment')} and run again")
            return "assignment"
        if name in ("command", "builtin", "exec") and len(rest) > 1 and rest[1].plain == "ulimit":
            if self.key is None and _ulimit_sets_nofile(rest[2:]) is not False:
                self._refuse(command.line, f"sets the open-file limit through `{name}`: write {_LINE_HINT} "
                                           f"{TOP_LEVEL_HINT} instead, and run again")
            return None
        if name == "ulimit" and self.key is None:
            sets = _ulimit_sets_nofile(rest[1:])
            if sets is None:
                self._refuse(command.line, "sets a limit named by an expansion, which may be the open-file limit: "
                                           f"write {_LINE_HINT} {TOP_LEVEL_HINT}, and run again")
            return "ulimit" if sets else None
        if name == "eval" and any(("ulimit" if key is None else key) in word.raw for word in rest[1:]):
            what = "the open-file limit" if key is None else key
            self._refuse(command.line, f"evaluates text that may set {what}, which cannot be read without running "
                                       f"it: write {self._what('assignment' if key else 'ulimit')} instead, and run "
                                       "again")
        if not key or not rest:
            return None
        if name in ("export", "readonly", "local", "typeset", "declare"):
            for word in rest[1:]:
                if word.raw.startswith(f"{key}=") and name == "export":
                    return "assignment"
                if word.plain == key and name == "export":
                    continue  # exporting does not change the value
                if word.plain == key or word.raw.startswith(f"{key}="):
                    self._refuse(command.line, f"`{name} {key}` changes how {key} can be set, which this "
                                               f"package cannot follow: remove it, or make it "
                                               f"{self._what('assignment')}, and run again")
        if name in ("unset", "read", "getopts") and any(word.plain == key for word in rest[1:]):
            self._refuse(command.line, f"`{name}` changes {key} in a way this package cannot read: remove it (this "
                                       f"package sets {key} with {self._what('assignment')}) and run again")
        return None

    def _accept(self, command, kind):
        line, what = command.line, self._what(kind)
        if command.frames:
            sub = any(label.startswith(("a ( )", "a command substitution")) for label, _ in command.frames)
            effect = ("a subshell cannot change the value of the shell that reads this file" if sub else
                      "it runs only when and as often as that runs")
            self._refuse(line, f"is inside {_why_frames(command.frames)}: {effect}, so the file does not say what "
                               f"the daemon gets; make it {what} {TOP_LEVEL_HINT}, or remove it, and run again")
        if line in self.scan.continued:
            self._refuse(line, f"continues the command of line {self.scan.continued[line]} (a `\\` at the end of a "
                               f"line, or a quoted string across lines); make it {what}, and run again")
        if command.last_line != line:
            self._refuse(line, f"continues onto line {command.last_line} (a `\\` at the end of the line, or a quoted "
                               f"string across lines): write {what} on one line, and run again")
        if command.before not in ("\n",) or command.after not in ("\n", "eof"):
            shared = command.before if command.before != "\n" else command.after
            self._refuse(line, f"shares its line with other commands (`{shared}`): make it {what} "
                               f"{TOP_LEVEL_HINT}, and run again")
        body = self.lines[line - 1]
        if kind == "ulimit":
            self._accept_ulimit(line, body)
        else:
            self._accept_assignment(line, body)

    def _accept_ulimit(self, line, body):
        match = ULIMIT_LINE.match(body)
        if not match:
            self._refuse(line, f"is not {_LINE_HINT}: its value comes from an expansion (write the number), or it "
                               "has redirections or more words; make it that plain line, and run again")
        letters = match.group("flags").replace("-", "").replace(" ", "").replace("\t", "")
        if set(letters) - set("SHn"):
            self._refuse(line, f"names other limits too (-{''.join(sorted(set(letters) - set('SHn')))}); dash sets "
                               f"only the last one named: write the open-file limit as {_LINE_HINT}, and run again")
        if "S" in letters and "H" in letters:
            last = "hard" if letters.rindex("H") > letters.rindex("S") else "soft"
            self._refuse(line, f"combines -S and -H: dash (Debian's /bin/sh) applies only the last one named (here "
                               f"the {last} limit), bash applies both; write `ulimit -n N` to set both, or "
                               "`ulimit -n H` then `ulimit -Sn S`, and run again")
        tail = match.group("tail")
        broken = tail.endswith("\r") and "#" not in tail  # dash: "bad number" or "too many arguments"
        value = match.group("value")
        self.ulimits.append({
            "line": line, "indent": match.group("indent"), "tail": tail[:-1] if tail.endswith("\r") else tail,
            "which": "S" if "S" in letters else "H" if "H" in letters else "SH",
            "value": None if broken else (value if value == "unlimited" else int(value)),
        })

    def _accept_assignment(self, line, body):
        match = self._assignment.match(body)
        if not match or (match.group("cr") and match.group("tail")):
            self._refuse(line, f"is not {self._what('assignment')}: its value comes from an expansion (`$X`, "
                               "`$(...)`) or has characters a shell would expand, or there are more words; write "
                               f"{self.key}=VALUE, and run again")
        raw = match.group("value")
        quote = raw[0] if raw[:1] in ("'", '"') else ""
        tail = match.group("tail")
        self.assignments.append({
            "line": line, "indent": match.group("indent"), "export": match.group("export") or "", "quote": quote,
            # dash keeps a CR before the newline as part of the value
            "value": (raw[1:-1] if quote else raw) + match.group("cr"),
            "tail": tail[:-1] if tail.endswith("\r") else tail,
        })

    def _refuse_continued(self, starts):
        """Text that reads like a managed line but continues another command
        (after a `\\`, inside a quoted string across lines): as written it is
        not a command of its own, which a reader of the file would not see."""
        looks = _ULIMIT_LOOKS if self.key is None else re.compile(
            r"(?:^|[\s;&|({`])(?:export[ \t]+|readonly[ \t]+)?" + re.escape(self.key) + "=")
        for line, origin in sorted(self.scan.continued.items()):
            if line in starts or line in self.scan.heredoc or line > len(self.lines):
                continue
            if looks.search(self.lines[line - 1]):
                what = self._what("ulimit" if self.key is None else "assignment")
                self._refuse(line, f"continues the command of line {origin} (a `\\` at the end of a line, or a "
                                   f"quoted string across lines): it does not run as a command of its own; make it "
                                   f"{what}, and run again")

    def _refuse_other_writes(self):
        key = self.key
        for word in self.scan.for_names:
            if word.plain == key:
                self._refuse(word.line, f"is a for loop over {key}, which changes {key}: use another variable name, "
                                        "and run again")
        assigns = re.compile(r"(?<![A-Za-z0-9_])" + re.escape(key) + r"[ \t]*(?:[-+*/%&|^]|<<|>>)?=(?!=)")
        for line, text in self.scan.arithmetic:
            if assigns.search(text):
                self._refuse(line, f"assigns {key} inside $(( )): write {self._what('assignment')} instead, and "
                                   "run again")
        for line, text in self.scan.parameters:
            if re.match(re.escape(key) + r":?=", text):
                self._refuse(line, f"sets {key} only when it is unset (${{{key}:=...}}), which depends on who sources "
                                   f"the file: write {self._what('assignment')} instead, and run again")

    # ------------------------------------------------------------- values
    def ulimit_values(self):
        """(soft, hard) the file leaves: later lines win; None = not set here."""
        soft = hard = None
        for entry in self.ulimits:
            if entry["value"] is None:
                continue
            if "S" in entry["which"]:
                soft = entry["value"]
            if "H" in entry["which"]:
                hard = entry["value"]
        return soft, hard

    def assignment_value(self):
        return self.assignments[-1]["value"] if self.assignments else None
