#!/usr/bin/env python3
"""Fails when `make demo` would link a system library its installer does not install.

Walks the package manifest (`swift package dump-package`) from the coupon-demo executable
through its target dependencies, collects the apt providers of every system-library target it
reaches, and checks that `scripts/install-deps.sh --list demo` names each one. A fresh machine
runs `make demo` before `make test`, so a new C dependency of the demo must be added to the demo
profile, not only to the test profile. Run by `make test`.
"""
import json
import subprocess
import sys

manifest = json.loads(subprocess.run(["swift", "package", "dump-package"], check=True, capture_output=True, text=True).stdout)
targets = {t["name"]: t for t in manifest["targets"]}
products = {p["name"]: p for p in manifest["products"]}
demo_target = products["coupon-demo"]["targets"][0]

seen, stack, needed = set(), [demo_target], {}
while stack:
    name = stack.pop()
    if name in seen or name not in targets:
        continue
    seen.add(name)
    t = targets[name]
    if t["type"] == "system":
        apt = [pkg for prov in t.get("providers") or [] for pkg in (prov.get("apt") or [[]])[0]]
        if not apt:
            sys.exit(f"system library {name} has no apt provider in Package.swift")
        needed[name] = apt
    for dep in t.get("dependencies", []):
        for kind in ("byName", "target"):
            if kind in dep:
                stack.append(dep[kind][0])

listed = set(subprocess.run(["bash", "scripts/install-deps.sh", "--list", "demo"], check=True, capture_output=True, text=True).stdout.split())
missing = {name: [p for p in apt if p not in listed] for name, apt in needed.items()}
missing = {k: v for k, v in missing.items() if v}
if missing:
    for name, pkgs in missing.items():
        print(f"coupon-demo links {name}, but scripts/install-deps.sh's demo profile does not install {', '.join(pkgs)}", file=sys.stderr)
    sys.exit(1)
summary = ", ".join("%s (%s)" % (k, " ".join(v)) for k, v in sorted(needed.items()))
print("demo system libraries, all installed by `make demo`: " + summary)
