"""The SQL layer: db.sql() statements checked (check), planned (plan, over sqlglot trees: tree),
run (run) and returned (rows). Uses storage's and search's public names only and never imports
the database, package, knowledge or cli layers (docs/architecture.md).
"""
