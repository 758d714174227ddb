"""
Reading POSIX shell the way dash reads it, only as far as this package needs:
where each simple command of a shell file is. One scan gives every simple
command with the compound commands around it (``if``, ``case``, loops,
``{ }``, ``( )``, function bodies, command substitutions), the lines that
continue a command (a ``\\`` at the end of the line before, a quoted string
across lines) and the lines that are here-document text.
``sstuning_shellforms`` decides from that which lines set what this package
manages. ``check_shell`` asks the shell itself (``sh -n``) whether a text
parses. Text in, facts out: nothing here writes a file.
"""

import os
import re
import shutil
import subprocess

from salt.exceptions import CommandExecutionError

SH = "/bin/sh"
CHECK_TIMEOUT = 10  # seconds; `sh -n` of a few kilobytes takes about a millisecond
_CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
# Shells whose own `-n` a file with that `#!` line is checked with (when installed).
_OWN_CHECK = ("bash", "ksh", "mksh", "zsh")

_BLANK = " \t"  # the only blanks of the shell grammar: a CR is part of a word (dash: `5\r` is a bad number)
_METACHARS = " \t\n;&|()<>"
_OPERATORS = ("<<-", "&&", "||", ";;", ";&", "<<", ">>", "<&", ">&", "<>", ">|", ";", "&", "|", "(", ")", "<", ">")
_REDIRECTS = {"<<-", "<<", ">>", "<&", ">&", "<>", ">|", "<", ">"}
_SEPARATORS = {"&&", "||", ";", "&", "|"}
_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"

_LOOP_LABEL = {"while": "a while loop", "until": "an until loop", "for": "a for loop"}


class _Confused(Exception):
    """The scan lost track of the structure (the file parsed for `sh -n`, so
    this is a construct this reader does not know): refuse, never guess."""

    def __init__(self, line, what):
        super().__init__(what)
        self.line = line
        self.what = what


class Word:
    __slots__ = ("raw", "plain", "line", "end_line")

    def __init__(self, raw, plain, line, end_line):
        self.raw = raw  # the source text
        self.plain = plain  # the text after quote removal; None when it holds an expansion ($..., `...`)
        self.line = line
        self.end_line = end_line


class Command:
    """One simple command: its words, its lines, the compound commands around
    it (outermost first, as (label, line)) and the operators around it."""

    __slots__ = ("words", "line", "last_line", "frames", "before", "after")

    def __init__(self, words, frames, before):
        self.words = words
        self.line = words[0].line
        self.last_line = max(word.end_line for word in words)
        self.frames = frames
        self.before = before
        self.after = None


class Scan:
    """One pass over a shell text (see the module docstring). Attributes:
    ``commands`` (every simple command, in order), ``heredoc`` (line numbers
    of here-document text), ``continued`` ({line: line of the command it
    continues}), ``for_names`` (the variable words of for loops) and
    ``arithmetic`` and ``parameters`` ([(line, text)] of every ``$((...))``
    and ``${...}``)."""

    def __init__(self, text):
        self.text = text
        self.pos = 0
        self.line = 1
        self.commands = []
        self.heredoc = set()
        self.continued = {}
        self.for_names = []
        self.arithmetic = []
        self.parameters = []
        self._pending_heredocs = []
        self._origin = 1  # the line the command being read began on
        self._nesting = 0  # inside $( ): every newline continues the outer command
        self._script(None, ())

    # ---------------------------------------------------------------- lexer
    def _newline(self, continued):
        """Consume one "\\n"; the next line continues a command when the newline
        was inside a word, a quote, a substitution or after a backslash."""
        self.pos += 1
        self.line += 1
        if continued or self._nesting:
            self.continued.setdefault(self.line, self._origin)

    def _token(self):
        """("word", Word) | ("io", None) | ("op", text) | ("nl", None) | ("eof", None)."""
        text = self.text
        while True:
            if self.pos >= len(text):
                return "eof", None
            char = text[self.pos]
            if char in _BLANK:
                self.pos += 1
            elif char == "\\" and text.startswith("\\\n", self.pos):
                self.pos += 1
                self._newline(True)
            elif char == "#":  # a comment: to the end of the line, backslashes and all
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                break
        if char == "\n":
            self._newline(False)
            self._read_heredocs()
            return "nl", None
        for op in _OPERATORS:
            if text.startswith(op, self.pos):
                self.pos += len(op)
                return "op", op
        word = self._word()
        if word.raw.isdigit() and text[self.pos:self.pos + 1] in ("<", ">"):
            return "io", None  # `2>/dev/null`: a file descriptor number, not an argument
        return "word", word

    def _word(self):
        text, start, line = self.text, self.pos, self.line
        plain, expansion = [], False
        while self.pos < len(text):
            char = text[self.pos]
            if char in _METACHARS:
                break
            if char == "\\":
                following = text[self.pos + 1:self.pos + 2]
                if following == "\n":
                    self.pos += 1
                    self._newline(True)
                else:
                    plain.append(following or "\\")
                    self.pos += 1 + len(following)
            elif char == "'":
                plain.append(self._single_quote())
            elif char == '"':
                literal = self._double_quote()
                expansion = expansion or literal is None
                plain.append(literal or "")
            elif char == "`":
                self._backquote()
                expansion = True
            elif char == "$":
                literal = self._dollar(False)
                expansion = expansion or literal is None
                plain.append(literal or "")
            else:
                plain.append(char)
                self.pos += 1
        return Word(text[start:self.pos], None if expansion else "".join(plain), line, self.line)

    def _consume_to(self, end, what):
        """Move past the next `end` (a quote), counting the lines on the way."""
        found = self.text.find(end, self.pos)
        if found < 0:
            raise _Confused(self.line, f"an unterminated {what}")
        body = self.text[self.pos:found]
        for _ in range(body.count("\n")):
            self.line += 1
            self.continued.setdefault(self.line, self._origin)
        self.pos = found + len(end)
        return body

    def _single_quote(self):
        self.pos += 1
        return self._consume_to("'", "' quote")

    def _double_quote(self):
        """The literal text of "...", or None when it holds an expansion."""
        text, line = self.text, self.line
        self.pos += 1
        plain, expansion = [], False
        while True:
            if self.pos >= len(text):
                raise _Confused(line, 'an unterminated " quote')
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                return None if expansion else "".join(plain)
            if char == "\\" and text[self.pos + 1:self.pos + 2] in ('"', "\\", "$", "`", "\n"):
                if text[self.pos + 1] == "\n":
                    self.pos += 1
                    self._newline(True)
                else:
                    plain.append(text[self.pos + 1])
                    self.pos += 2
            elif char == "$":
                literal = self._dollar(True)
                expansion = expansion or literal is None
                plain.append(literal or "")
            elif char == "`":
                self._backquote()
                expansion = True
            elif char == "\n":
                plain.append(char)
                self._newline(True)
            else:
                plain.append(char)
                self.pos += 1

    def _backquote(self):
        text, line = self.text, self.line
        self.pos += 1
        while True:
            if self.pos >= len(text):
                raise _Confused(line, "an unterminated ` command substitution")
            char = text[self.pos]
            if char == "`":
                self.pos += 1
                return
            if char == "\\":
                self.pos += 1
                if text[self.pos:self.pos + 1] == "\n":
                    self._newline(True)
                    continue
            if self.pos < len(text) and text[self.pos] == "\n":
                self._newline(True)
            else:
                self.pos += 1

    def _dollar(self, quoted):
        """Move past a `$` expansion; returns "$" when it is a plain dollar
        sign, None for an expansion."""
        text, line = self.text, self.line
        following = text[self.pos + 1:self.pos + 2]
        if text.startswith("$((", self.pos):
            start = self.pos + 3
            self.pos += 1
            depth = 0
            while True:
                if self.pos >= len(text):
                    raise _Confused(line, "an unterminated $(( arithmetic ))")
                char = text[self.pos]
                if char == "(":
                    depth += 1
                elif char == ")":
                    depth -= 1
                    if depth == 0:
                        self.pos += 1
                        break
                elif char == "\n":
                    self._newline(True)
                    continue
                elif char == "$":
                    self._dollar(True)
                    continue
                self.pos += 1
            self.arithmetic.append((line, text[start:self.pos - 2]))
            return None
        if following == "(":
            self.pos += 2
            self._nesting += 1
            try:
                self._script(")", (("a command substitution $( )", line),))
            finally:
                self._nesting -= 1
            return None
        if following == "{":
            self.pos += 2
            start = self.pos
            while True:
                if self.pos >= len(text):
                    raise _Confused(line, "an unterminated ${ parameter expansion }")
                char = text[self.pos]
                if char == "}":
                    self.parameters.append((line, text[start:self.pos]))
                    self.pos += 1
                    return None
                if char == "\\":
                    self.pos += 2
                elif char == "'" and not quoted:
                    self._single_quote()
                elif char == '"':
                    self._double_quote()
                elif char == "`":
                    self._backquote()
                elif char == "$":
                    self._dollar(quoted)
                elif char == "\n":
                    self._newline(True)
                else:
                    self.pos += 1
        if following and (following in _NAME_CHARS or following in "@*#?-$!"):
            self.pos += 2
            if following in _NAME_CHARS and not following.isdigit():
                while self.pos < len(text) and text[self.pos] in _NAME_CHARS:
                    self.pos += 1
            return None
        self.pos += 1
        return "$"

    def _read_heredocs(self):
        """After the newline that ends a line with `<<EOF`: its text, up to a
        line that is exactly the delimiter (tabs stripped for `<<-`), is no
        command at all. A missing delimiter ends the text at the end of the
        file, as dash does."""
        text = self.text
        while self._pending_heredocs:
            delimiter, strip_tabs = self._pending_heredocs.pop(0)
            while self.pos < len(text):
                end = text.find("\n", self.pos)
                end = len(text) if end < 0 else end
                body = text[self.pos:end]
                self.heredoc.add(self.line)
                self.pos = end
                if self.pos < len(text):
                    self.pos += 1
                    self.line += 1
                if (body.lstrip("\t") if strip_tabs else body) == delimiter:
                    break

    # --------------------------------------------------------------- parser
    def _script(self, closing, base):
        """Commands up to the end of the text (or the `)` of a `$(`), with the
        frames open around each."""
        stack = []  # [kind, label, line]
        words, before, expect = [], "\n", None
        closed = False  # a compound command just ended: only redirections or an operator follow
        function = None  # (name, line) of `name()` until its body starts
        function_frame = ()  # `name() command`: the frame of that one simple command
        heredoc_tabs = False  # the pending redirection is `<<-`
        redirected = False  # a redirection began the simple command: no reserved word follows
        case_first = False  # at the first word of a case pattern (where `esac` may come)

        def frames():
            return base + tuple((label, line) for _, label, line in stack)

        def end(after):
            nonlocal words, function_frame, redirected
            redirected = False
            if words:
                command = Command(words, frames() + function_frame, before)
                command.after = after
                self.commands.append(command)
            words = []
            function_frame = ()

        def push(kind, label):
            nonlocal function
            if function:
                label = f"the body of function {function[0]}() (line {function[1]})"
                function = None
            stack.append([kind, label, self.line])

        def pop(kind, word):
            if not stack or stack[-1][0] != kind:
                raise _Confused(self.line, f"`{word}` without its opening word")
            stack.pop()

        while True:
            kind, value = self._token()
            if kind == "eof":
                if closing:
                    raise _Confused(self.line, "a $( without its )")
                end("eof")
                if stack:
                    raise _Confused(stack[-1][2], f"{stack[-1][1]} that is not closed")
                return
            if expect in ("redirect", "heredoc"):
                if kind != "word":
                    raise _Confused(self.line, "a redirection without its target")
                if expect == "heredoc":
                    delimiter = value.plain if value.plain is not None else re.sub(r"[\"'\\]", "", value.raw)
                    self._pending_heredocs.append((delimiter, heredoc_tabs))
                expect = None
                continue
            if kind == "io":
                redirected = redirected or not closed
                continue
            if expect == "for_name":
                self.for_names.append(value)
                expect = "for_in"
                continue
            if expect == "for_in":
                if kind == "nl":
                    continue
                if kind == "word" and value.raw == "in":
                    expect = "for_words"
                    continue
                expect = None
                if kind == "op" and value == ";":
                    continue
            if expect == "for_words":
                if kind == "word":
                    continue
                expect = None
                if kind == "nl" or value == ";":
                    continue
            if expect == "case_word":
                expect = "case_in"
                continue
            if expect == "case_in":
                if kind == "nl":
                    continue
                if kind == "word" and value.raw == "in":
                    expect, case_first = "case_pattern", True
                    continue
                raise _Confused(self.line, "a case without `in`")
            if expect == "case_pattern":
                if kind == "nl":
                    continue
                if kind == "word" and case_first and value.raw == "esac":
                    pop("case", "esac")
                    expect, closed = None, True
                    continue
                if kind == "op" and value == ")":
                    expect, before = None, ")"
                    continue
                case_first = False
                continue  # pattern words, `(` and `|`
            if expect == "func_close":
                if kind == "op" and value == ")":
                    expect = None
                    continue
                raise _Confused(self.line, "a function name without `()`")
            # ------------------------------------------------- operators
            if kind == "nl":
                if not words and before in ("|", "&&", "||"):
                    continue  # a pipeline or an and-or list goes on past the newline
                end("\n")
                before, closed = "\n", False
                continue
            if kind == "op":
                if value in _REDIRECTS:
                    redirected = redirected or not closed
                    expect = "heredoc" if value.startswith("<<") else "redirect"
                    heredoc_tabs = value == "<<-"
                    continue
                if value in _SEPARATORS:
                    end(value)
                    before, closed = value, False
                    continue
                if value in (";;", ";&"):
                    end(value)
                    if not stack or stack[-1][0] != "case":
                        raise _Confused(self.line, f"`{value}` outside a case")
                    expect, case_first, before, closed = "case_pattern", True, value, False
                    continue
                if value == "(":
                    if len(words) == 1 and words[0].plain and not closed:
                        function = (words[0].plain, words[0].line)  # `name()`: a function definition
                        words = []
                        expect = "func_close"
                        continue
                    if words or closed:
                        raise _Confused(self.line, "a `(` in the middle of a command")
                    push("(", "a ( ) subshell")
                    before = "("
                    continue
                if value == ")":
                    end(")")
                    if stack and stack[-1][0] == "(":
                        stack.pop()
                        closed = True
                        continue
                    if not stack and closing == ")":
                        return
                    raise _Confused(self.line, "a `)` without its `(`")
            # ------------------------------------------------- words
            reserved = value.raw if not words and not redirected and value.raw == value.plain else None
            if closed and reserved not in ("fi", "done", "esac", "}", "then", "do", "else", "elif"):
                raise _Confused(self.line, f"{value.raw!r} right after the end of a compound command")
            closed = False
            if reserved in ("if", "while", "until", "for", "case", "{"):
                label = {"if": "an if", "case": "a case", "{": "a { } group"}.get(reserved) or _LOOP_LABEL[reserved]
                push({"while": "loop", "until": "loop", "for": "loop"}.get(reserved, reserved), label)
                expect = {"for": "for_name", "case": "case_word"}.get(reserved)
                continue
            if reserved in ("then", "elif", "else"):
                if not stack or stack[-1][0] != "if":
                    raise _Confused(self.line, f"`{reserved}` outside an if")
                continue
            if reserved == "do":
                if not stack or stack[-1][0] != "loop":
                    raise _Confused(self.line, "`do` outside a loop")
                continue
            closer = {"fi": "if", "done": "loop", "esac": "case", "}": "{"}.get(reserved)
            if closer:
                pop(closer, reserved)
                closed = True
                continue
            if reserved == "!":
                before = "!"
                continue
            if not words:
                self._origin = value.line
                if function:  # `name() command`: a simple command as the body
                    function_frame = ((f"the body of function {function[0]}() (line {function[1]})", function[1]),)
                    function = None
            words.append(value)


def scan(text, path):
    """A Scan of `text`, or CommandExecutionError naming the line where this
    reader lost track (it never guesses which lines run)."""
    try:
        return Scan(text or "")
    except _Confused as exc:
        raise CommandExecutionError(
            f"{path}:{exc.line}: cannot follow the shell structure here ({exc.what}); this package edits only "
            "files it can read line by line: set the limit by hand, or remove this file from pillar"
        )


# --------------------------------------------------------------------------
# The shell itself: does it parse?
# --------------------------------------------------------------------------
def shell_for(text):
    """The shell that checks `text`: its `#!` shell when that is bash, ksh,
    mksh or zsh and installed, else /bin/sh (also for a sourced file, which
    the init script's /bin/sh reads)."""
    first = (text or "").split("\n", 1)[0]
    if first.startswith("#!"):
        words = first[2:].split()
        program = os.path.basename(words[0]) if words else ""
        if program == "env":
            program = os.path.basename(next((w for w in words[1:] if not w.startswith("-")), ""))
        if program in _OWN_CHECK:
            found = shutil.which(program, path=_CLEAN_ENV["PATH"])
            if found:
                return found
    return SH


def check_shell(text, path, shell=None):
    """Run `shell -n` (parse only, nothing runs) on `text` through stdin:
    an argv list (no shell parses it), a clean environment, bounded in time. Raises
    CommandExecutionError with the shell's own message, as `path:line: ...`."""
    shell = shell or shell_for(text)
    try:
        proc = subprocess.run(
            [shell, "-n"], input=(text or "").encode("utf-8", "surrogateescape"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=_CLEAN_ENV, cwd="/", timeout=CHECK_TIMEOUT, check=False,
        )
    except OSError as exc:
        raise CommandExecutionError(f"{path}: cannot check the shell syntax with `{shell} -n`: {exc.strerror or exc}")
    except subprocess.TimeoutExpired:
        raise CommandExecutionError(f"{path}: `{shell} -n` did not finish within {CHECK_TIMEOUT} s")
    if proc.returncode == 0:
        return
    message = " ".join(proc.stderr.decode("utf-8", "replace").split()) or f"exit status {proc.returncode}"
    # dash: "sh: 4: Syntax error: ..."; bash: "bash: line 4: syntax error ...".
    match = re.match(r"^[^:]*: (?:line )?(\d+): (.*)$", message)
    where = f"{path}:{match.group(1)}" if match else path
    raise CommandExecutionError(f"{where}: {match.group(2) if match else message} (`{os.path.basename(shell)} -n`)")


def check_original(text, path):
    """Refuse a file that did not parse before this package touched it."""
    try:
        check_shell(text, path)
    except CommandExecutionError as exc:
        raise CommandExecutionError(
            f"{exc}: {path} does not parse as a shell script as it is now, before any edit by this package: fix it "
            "(or put back its packaged version) and run again; nothing was written"
        )
