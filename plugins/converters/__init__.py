"""Converters: command-line tools that turn someone else's checkpoint into files the components load
(``prsmed convert ...``). They sit outside the component folders: a converter runs once, offline, and no
component imports one."""
