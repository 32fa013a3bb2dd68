"""The process target: splice an update into running x86-64 processes through ptrace (match,
load, stop window, undo), with a record of it inside the process and a journal outside."""
