"""The package's layout rules that a reviewer would otherwise have to remember.

The store package owns every table: its schema and every SQL statement. A query written anywhere else would
be a second owner of a table, which the next schema change would miss.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "langfuse_poller"
STORE = PACKAGE / "store"

# upper case, as the package writes its SQL: prose in docstrings ("select the rules that ...") does not match
SQL = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+(?:OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bCREATE\s+(?:TABLE|(?:UNIQUE\s+)?INDEX)\b"
)
# a connection's or cursor's statement methods. Redis pipelines' `execute()` takes no argument and CEL programs'
# `execute(...)` takes the activation (a dict): an `execute` is a statement when its first argument is text.
# Neither has `executemany` or `executescript`
STATEMENT_METHODS = frozenset({"execute", "executemany", "executescript"})
# what hands out the store's connection or a cursor: a query helper fed by one (say `load(conn, "state = ?")`)
# would hold no statement of its own to catch
CONNECTION_METHODS = frozenset({"connection", "_conn", "cursor"})


def _text(node: ast.expr) -> str | None:
    """The literal text of a string expression (f-string placeholders as `{}`), None when it is not one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        if left is not None or right is not None:
            return (left or "{}") + (right or "{}")
    return None


def _sql_in(source: str, where: str) -> Iterator[str]:
    """What in this module's source is SQL: a sqlite3 import, a statement run, a statement's text, or a
    connection taken to run one elsewhere."""
    tree = ast.parse(source)
    inside_fstring: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inside_fstring.update(id(value) for value in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "sqlite3" for alias in node.names):
            yield f"{where}:{node.lineno}: imports sqlite3"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlite3":
            yield f"{where}:{node.lineno}: imports from sqlite3"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in STATEMENT_METHODS
            and (node.func.attr != "execute" or (node.args and _text(node.args[0]) is not None))
        ):
            yield f"{where}:{node.lineno}: runs a statement with .{node.func.attr}()"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CONNECTION_METHODS
            and not node.args
        ):
            yield f"{where}:{node.lineno}: takes a connection with .{node.func.attr}()"
        elif (
            isinstance(node, ast.Constant | ast.JoinedStr)
            and id(node) not in inside_fstring
            and (text := _text(node)) is not None
            and SQL.search(text)
        ):
            yield f"{where}:{node.lineno}: SQL in a string: {text.strip()[:60]!r}"


def test_no_sql_outside_the_store_package() -> None:
    found = [
        problem
        for path in sorted(PACKAGE.rglob("*.py"))
        if STORE not in path.parents
        for problem in _sql_in(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    ]
    assert not found, "SQL belongs in langfuse_poller/store/ (add a method there):\n" + "\n".join(found)


def test_the_sql_check_tells_statements_from_redis_and_cel() -> None:
    """The check itself: what it must catch, and the `execute` calls that are not SQL."""
    cases = {
        "import sqlite3": "imports sqlite3",
        "from sqlite3 import Error": "imports from sqlite3",
        "conn.execute(query + ' ORDER BY id', params)": "runs a statement",
        "tx.conn.executemany(statement, rows)": "runs a statement",
        "rows = f'SELECT {columns} FROM alert_groups'": "SQL in a string",
        "query = 'DELETE FROM dead_letters WHERE id = ?'": "SQL in a string",
        "groups = load_groups(store.connection(), 'state = ?')": "takes a connection",
        "rows = runtime.store._conn()": "takes a connection",
        "self.server.fake._track(self.connection, True)": None,
        "pipe.execute()": None,
        "value, ttl = self._call('read the lease', pipe.execute)": None,
        "program.execute(dict(envelope))": None,
        '"""Select the rules that apply, from the config."""': None,
    }
    for line, expected in cases.items():
        found = list(_sql_in(line, "probe.py"))
        if expected is None:
            assert not found, (line, found)
        else:
            assert len(found) == 1 and expected in found[0], (line, found)
