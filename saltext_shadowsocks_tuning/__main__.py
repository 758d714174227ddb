"""The package's command line:

    python -m saltext_shadowsocks_tuning tune [--apply] [--clean] [--pillar FILE] [--nofile N]
                                                   the tuning of this box, masterless (see tune.py)
    python -m saltext_shadowsocks_tuning file-roots       the directory for file_roots (shadowsocks/tuning/*.sls)
    python -m saltext_shadowsocks_tuning pillar-example   the installed pillar.example
    python -m saltext_shadowsocks_tuning version

Under onedir Salt (`salt-pip install`), run it with Salt's own Python:
/opt/saltstack/salt/bin/python3 -m saltext_shadowsocks_tuning file-roots
"""

import os
import sys

from saltext_shadowsocks_tuning import __version__, file_roots_dir, pillar_example

COMMANDS = {
    "file-roots": file_roots_dir,
    "pillar-example": pillar_example,
    "version": lambda: __version__,
}


def main(argv):
    if argv[:1] == ["tune"]:
        from saltext_shadowsocks_tuning import tune  # pylint: disable=import-outside-toplevel

        # ./tune in a checkout names itself, so that the next command it prints is one to type.
        return tune.main(argv[1:], prog=os.environ.get("TUNE_PROG") or "python -m saltext_shadowsocks_tuning tune")
    if len(argv) != 1 or argv[0] not in COMMANDS:
        sys.stderr.write(__doc__.lstrip())
        return 0 if argv in (["-h"], ["--help"]) else 2
    print(COMMANDS[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
