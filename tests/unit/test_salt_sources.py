"""The Salt face, read as source (no Salt loader, no dunders): every public
function documents a CLI example, and the SLS files are wiring only, with
fixed state IDs that no pillar text can reach."""

import ast

import pytest
import yaml

from support.common import REPO

SALT_FACES = [*sorted((REPO / "_modules").glob("*.py")), REPO / "_states" / "shadowsocks_tuning.py"]
SLS_FILES = sorted((REPO / "salt" / "shadowsocks" / "tuning").glob("*.sls"))
# Top-level keys of an SLS file that are not state IDs.
SLS_KEYWORDS = {"include", "extend"}


def public_functions(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_")]


@pytest.mark.parametrize("path", SALT_FACES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_public_function_documents_a_cli_example(path):
    functions = public_functions(path)
    assert functions, f"no public function found in {path}"
    missing = [f.name for f in functions if "CLI Example:" not in (ast.get_docstring(f) or "")]
    assert not missing, f"{path.parent.name}: public functions without a CLI Example (salt-call sys.doc shows it): {missing}"


def test_the_sls_files_are_there():
    assert {p.name for p in SLS_FILES} >= {"init.sls", "sysctl.sls", "nofile.sls", "clean.sls"}


@pytest.mark.parametrize("path", SLS_FILES, ids=lambda p: p.name)
def test_sls_state_ids_are_fixed_literals(path):
    text = path.read_text()
    # No template: pillar text could otherwise become part of a state ID or argument.
    assert "{{" not in text and "{%" not in text and "{#" not in text, f"{path.name} is templated"
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    ids = [key for key in data if key not in SLS_KEYWORDS]
    assert ids or "include" in data
    for state_id in ids:
        assert isinstance(state_id, str) and state_id.startswith("shadowsocks-tuning-"), state_id
        assert all(c.islower() or c.isdigit() or c == "-" for c in state_id), state_id
        (function,) = [k for k in data[state_id] if "." in k]
        assert function.startswith("shadowsocks_tuning."), (state_id, function)


def test_state_ids_are_unique_across_the_sls_files():
    ids = [key for path in SLS_FILES for key in yaml.safe_load(path.read_text()) if key not in SLS_KEYWORDS]
    assert len(ids) == len(set(ids)), ids


def test_init_includes_the_two_halves():
    data = yaml.safe_load((REPO / "salt" / "shadowsocks" / "tuning" / "init.sls").read_text())
    assert data["include"] == ["shadowsocks.tuning.sysctl", "shadowsocks.tuning.nofile"]
