"""The small schema checks the manifest checkers share: faults are collected, not raised, so
one run reports every one of them."""
import sys

faults = []


def need(cond, message):
    """Records `message` as a fault unless `cond` holds."""
    if not cond:
        faults.append(message)


def keys(obj, where, allowed, required=()):
    """Checks that `obj` is a mapping with only `allowed` keys and every `required` one;
    returns it (an empty mapping when it is not one)."""
    if not isinstance(obj, dict):
        faults.append(f"{where}: not a mapping")
        return {}
    for k in obj:
        need(k in allowed, f"{where}: unknown field {k!r}")
    for k in required:
        need(k in obj, f"{where}: missing {k!r}")
    return obj


def finish():
    """Prints "ok" or the faults, one a line, and exits non-zero on any fault."""
    print("\n".join(faults) if faults else "ok")
    sys.exit(1 if faults else 0)
