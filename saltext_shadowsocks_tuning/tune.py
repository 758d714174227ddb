"""
`tune`: the tuning of this box, masterless, in one command.

    python -m saltext_shadowsocks_tuning tune                 dry run of state.apply shadowsocks.tuning
    python -m saltext_shadowsocks_tuning tune --apply         apply it
    python -m saltext_shadowsocks_tuning tune --clean [--apply]
    python -m saltext_shadowsocks_tuning tune --pillar my.sls (a file holding shadowsocks: tuning: ...)
    python -m saltext_shadowsocks_tuning tune --nofile N

It runs Salt in this process (``salt.client.Caller``, as ``salt-call
--local`` does) with file_roots on this package's SLS tree, syncs the
modules (an edited checkout is what runs), checks the pillar file with
Salt's own YAML loader and renderers, and prints Salt's highstate output and
the next command. Salt's data says what happened: nothing here reads Salt's
log or output text. Needs root (it reads and writes /proc/sys).
"""

import argparse
import logging
import os
import shutil
import sys

import yaml

from saltext_shadowsocks_tuning import file_roots_dir

SLS = "shadowsocks.tuning"
CLEAN_SLS = "shadowsocks.tuning.clean"


class Refused(Exception):
    """Bad input: one line for the user, exit status 2, nothing changed."""


def _parser(prog):
    parser = argparse.ArgumentParser(prog=prog, description="Tune this box for shadowsocks, masterless.")
    parser.add_argument("--apply", action="store_true", help="apply it (default: a dry run)")
    parser.add_argument("--clean", action="store_true", help="what undoing it would put back; with --apply, undo it")
    parser.add_argument("--pillar", metavar="FILE", help="your pillar: a file holding shadowsocks: tuning: ...")
    parser.add_argument("--nofile", metavar="N", help="the open-file limit for the daemons (default: 51200, or "
                                                      "the most this box can grant)")
    parser.add_argument("--work", metavar="DIR", default=os.path.expanduser("~/.cache/shadowsocks-tuning"),
                        help="where the minion's config, cache and log go")
    return parser


def _arguments(argv, prog):
    if "--pillar" in argv:  # said before argparse, which only knows that one argument is missing
        after = argv[argv.index("--pillar") + 1:][:1]
        if not after:
            raise Refused(f"--pillar needs a file: {prog} --pillar my.sls (a pillar file holding shadowsocks: "
                          "tuning: ..., see pillar.example)")
        if after[0].startswith("-"):
            raise Refused(f"--pillar needs a file, got the option '{after[0]}': {prog} --pillar my.sls")
    parser = _parser(prog)

    class _Parser(type(parser)):
        def error(self, message):  # one line, our wording
            raise Refused(f"{message} (try --help)")

    parser.__class__ = _Parser
    args = parser.parse_args(argv)
    if args.nofile is not None and not args.nofile.isdigit():
        raise Refused("--nofile needs a whole number, e.g. --nofile 20000")
    if args.pillar is not None and args.nofile is not None:
        raise Refused("put nofile in your pillar file, not next to --pillar")
    return args


def check_pillar_file(path):
    """Parse a pillar file as Salt would, before anything runs: a YAML
    error is one line with the line and column. Returns True when the file
    is templated (Jinja, or a ``#!`` renderer line): Salt renders it, and
    ``render_errors`` reports what fails."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise Refused(f"{path}: cannot be read as UTF-8 text: {exc}; nothing was changed") from None
    first = text.lstrip().split("\n", 1)[0]
    if any(mark in text for mark in ("{{", "{%", "{#")) or (first.startswith("#!") and first[2:].strip() != "yaml"):
        return True
    import salt.utils.yaml  # pylint: disable=import-outside-toplevel  (first: it imports its loader)
    from salt.utils.yamlloader import SaltYamlSafeLoader  # pylint: disable=import-outside-toplevel

    try:
        data = yaml.load(text, Loader=SaltYamlSafeLoader)  # nosec: Salt's safe loader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = ""
        if exc.context and exc.context_mark and exc.context_mark.line != mark.line:
            where = f" ({exc.context} that starts at line {exc.context_mark.line + 1})"
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        if "\t" in (text.splitlines()[mark.line:mark.line + 1] or [""])[0]:
            problem += " (a tab: YAML indents with spaces)"
        raise Refused(f"{path}, line {mark.line + 1}, column {mark.column + 1}: {problem}{where}; "
                      "nothing was changed") from None
    except yaml.YAMLError as exc:
        raise Refused(f"{path}: {' '.join(str(exc).split())}; nothing was changed") from None
    if data is not None and not (isinstance(data, dict) and "shadowsocks" in data):
        raise Refused(f"{path} holds no 'shadowsocks:' key at the top (expected shadowsocks: tuning: ..., see "
                      "pillar.example); nothing was changed")
    return False


def write_minion(work, pillar_path, nofile):
    """The minion config, pillar top and pillar file under ``work``."""
    os.makedirs(os.path.join(work, "pillar"), exist_ok=True)
    config = {
        "file_client": "local",
        "file_roots": {"base": [file_roots_dir()]},
        "pillar_roots": {"base": [os.path.join(work, "pillar")]},
        "cachedir": os.path.join(work, "cache"),
        "extension_modules": os.path.join(work, "extmods"),
        "pki_dir": os.path.join(work, "pki"),
        "log_file": os.path.join(work, "minion.log"),
        "log_level_logfile": "info",
        "state_verbose": False,
        "enable_fqdns_grains": False,
    }
    with open(os.path.join(work, "minion"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    with open(os.path.join(work, "pillar", "top.sls"), "w", encoding="utf-8") as handle:
        handle.write("base:\n  '*':\n    - shadowsocks\n")
    target = os.path.join(work, "pillar", "shadowsocks.sls")
    if pillar_path:
        shutil.copyfile(pillar_path, target)
    else:
        tuning = {"nofile": int(nofile)} if nofile else {}
        with open(target, "w", encoding="utf-8") as handle:
            yaml.safe_dump({"shadowsocks": {"tuning": tuning}} if tuning else {}, handle)
    return os.path.join(work, "minion")


def _caller(config_path):
    import salt.client  # pylint: disable=import-outside-toplevel
    import salt.config  # pylint: disable=import-outside-toplevel

    return salt.client.Caller(mopts=salt.config.minion_config(config_path))


def _quiet_logging(log_file):
    """Salt's messages go to the log file, not the terminal (what
    ``salt-call --log-level=quiet`` does)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s][%(levelname)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def render_errors(caller, pillar_file):
    """The pillar's render errors in one line. Salt's compiled pillar only
    says "Rendering SLS failed, see the log": the file is rendered once more
    through Salt's own renderers, whose exception carries the reason and the
    line."""
    errors = (caller.sminion.opts.get("pillar") or {}).get("_errors") or []
    if not errors:
        return ""
    if pillar_file:
        import salt.loader  # pylint: disable=import-outside-toplevel
        import salt.template  # pylint: disable=import-outside-toplevel
        from salt.exceptions import SaltRenderError  # pylint: disable=import-outside-toplevel

        opts = caller.sminion.opts
        renderers = salt.loader.render(opts, caller.sminion.functions)
        try:
            salt.template.compile_template(pillar_file, renderers, opts["renderer"], opts["renderer_blacklist"],
                                           opts["renderer_whitelist"])
        except SaltRenderError as exc:
            # The message, without the template excerpt Salt appends after a `---` line.
            return " ".join(str(exc).split("\n---", 1)[0].split())
    return "; ".join(" ".join(str(e).split()) for e in errors)


def failed(result):
    """Whether a state.apply result holds a failure (a list is Salt's render error)."""
    if not isinstance(result, dict):
        return True
    return any(isinstance(ret, dict) and ret.get("result") is False for ret in result.values())


def main(argv, prog="python -m saltext_shadowsocks_tuning tune", out=sys.stdout, err=sys.stderr):
    """The whole command; returns the exit status."""
    try:
        args = _arguments(argv, prog)
        if args.pillar is not None and not (os.path.isfile(args.pillar) and os.access(args.pillar, os.R_OK)):
            raise Refused(f"--pillar {args.pillar}: no such readable file")
        templated = check_pillar_file(args.pillar) if args.pillar else False
    except Refused as exc:
        err.write(f"tune: {exc}\n")
        return 2
    work = os.path.abspath(args.work)
    config_path = write_minion(work, args.pillar, args.nofile)
    _quiet_logging(os.path.join(work, "minion.log"))
    _caller(config_path).cmd("saltutil.sync_all")  # this checkout's modules, every run
    caller = _caller(config_path)  # a fresh loader: it sees what the sync shipped
    problem = render_errors(caller, os.path.join(work, "pillar", "shadowsocks.sls") if args.pillar else None)
    if problem:
        what = "did not render" if templated else "is not valid"
        err.write(f"tune: {args.pillar or 'the pillar'} {what}: {problem}; nothing was changed\n")
        return 2
    sls = CLEAN_SLS if args.clean else SLS
    result = caller.cmd("state.apply", sls, test=not args.apply)
    import salt.output  # pylint: disable=import-outside-toplevel

    opts = dict(caller.sminion.opts, color=out.isatty(), state_verbose=False)
    salt.output.display_output({"local": result}, "highstate", opts)
    again = (f" --nofile {args.nofile}" if args.nofile else "") + (f" --pillar {args.pillar}" if args.pillar else "")
    if failed(result):
        out.write("tune: a state failed (its comment above says why and what to do); nothing was changed by a "
                  "failed state\n")
        return 2
    if not args.apply and not args.clean:
        out.write(f"tune: dry run, nothing changed. Apply: {prog} --apply{again}   Undo later: {prog} --clean "
                  "--apply\n")
    elif not args.apply:
        out.write(f"tune: dry run, nothing changed. Undo: {prog} --clean --apply\n")
    return 0
