"""`just bench`: the suite against the textbook design, measured minutes apart on one machine.

`python -m bench --help` lists the scenarios and options; docs/performance.md reads the results.
"""
