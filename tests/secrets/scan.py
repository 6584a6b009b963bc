#!/usr/bin/env python3
"""Fail the build if a secret is committed: in the tracked tree or anywhere in git history.

Runs detect-secrets (PyPI) with the settings recorded in the reviewed baseline
(`tests/secrets/baseline.json`) over every tracked file and every blob reachable from any
ref. A finding passes only if the baseline lists its hash as reviewed and not a secret
(`"is_secret": false`): the test fixtures' keys. Anything else is printed with where it
is (file, line, and for history the commits that hold it) and the exit status is 1.

    tests/secrets/scan.py            # check (make secret-scan; make test runs it)
    tests/secrets/scan.py --update   # after review: rewrite the baseline from the tree
"""

import json
import os
import subprocess
import sys
import tempfile

from detect_secrets import SecretsCollection
from detect_secrets.settings import default_settings, transient_settings

BASELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baseline.json")
# sha256 digests (pinned plugins, fixtures) are hex of high entropy by design, not
# secrets; the other detectors (keys, tokens, private keys, base64 entropy, keywords) run.
DISABLED = {"HexHighEntropyString"}
# The baseline holds hashes of reviewed findings, not secrets; lock files hold integrity
# digests of packages.
EXCLUDED = ("Cargo.lock", "package-lock.json", "baseline.json")
# Fuzz corpora are machine-made inputs, random bytes by design.
EXCLUDED_DIRS = ("tests/fuzz/corpus/", "tests/fuzz/seeds/")


def excluded(path):
    return os.path.basename(path) in EXCLUDED or path.startswith(EXCLUDED_DIRS)


def git(*args, text=True):
    return subprocess.run(["git", *args], check=True, capture_output=True, text=text).stdout


def settings():
    with default_settings() as s:
        plugins = [{"name": p} for p in sorted(s.plugins) if p not in DISABLED]
    return {"plugins_used": plugins, "filters_used": []}


def scan(paths, root):
    """Findings under `root` as {(relative path, line, type, hash)}."""
    found = set()
    with transient_settings(settings()):
        collection = SecretsCollection(root=root)
        collection.scan_files(*paths)
        for filename, secret in collection:
            if os.path.isabs(filename):
                filename = os.path.relpath(filename, root)
            found.add((filename, secret.line_number, secret.type, secret.secret_hash))
    return found


def tracked(top):
    files = [f for f in git("ls-files", "-z").split("\0") if f]
    return [os.path.join(top, f) for f in files
            if not excluded(f) and os.path.isfile(os.path.join(top, f))]


def history(tmp):
    """Write every blob reachable from any ref under `tmp`, named by its path; returns the
    paths and, per path, the commits that reach it."""
    objects = git("rev-list", "--objects", "--all").splitlines()
    blobs = {}
    for line in objects:
        sha, _, path = line.partition(" ")
        if path and not excluded(path):
            blobs.setdefault(sha, path)
    kinds = subprocess.run(["git", "cat-file", "--batch-check=%(objectname) %(objecttype)"],
                           input="\n".join(blobs), check=True, capture_output=True,
                           text=True).stdout.split("\n")
    blob_shas = [k.split()[0] for k in kinds if k.endswith(" blob")]
    paths = []
    proc = subprocess.Popen(["git", "cat-file", "--batch"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    data = proc.communicate("\n".join(blob_shas).encode())[0]
    at = 0
    for sha in blob_shas:
        header_end = data.index(b"\n", at)
        size = int(data[at:header_end].split()[2])
        content = data[header_end + 1:header_end + 1 + size]
        at = header_end + 1 + size + 1
        if b"\0" in content[:8000]:
            continue  # binary: components, images
        path = os.path.join(tmp, sha, blobs[sha])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
        paths.append(path)
    return paths


def main():
    top = git("rev-parse", "--show-toplevel").strip()
    os.chdir(top)
    update = "--update" in sys.argv[1:]
    current = scan(tracked(top), top)
    if update:
        reviewed = [{"file": f, "line": n, "type": t, "hashed_secret": h, "is_secret": False}
                    for f, n, t, h in sorted(current)]
        with open(BASELINE, "w") as out:
            json.dump({"tool": "detect-secrets 1.5.0", "disabled_plugins": sorted(DISABLED),
                       "results": reviewed}, out, indent=2)
            out.write("\n")
        print(f"baseline: {len(reviewed)} reviewed findings written to {BASELINE}")
        return 0
    with open(BASELINE) as f:
        allowed = {r["hashed_secret"] for r in json.load(f)["results"] if not r["is_secret"]}
    bad = [("tree", f, n, t) for f, n, t, h in sorted(current) if h not in allowed]
    with tempfile.TemporaryDirectory() as tmp:
        past = scan(history(tmp), tmp)
    for f, n, t, h in sorted(past):
        if h not in allowed:
            sha, _, path = f.partition(os.sep)
            commits = git("log", "--all", "--format=%h", "--find-object=" + sha).split()
            bad.append((f"history ({', '.join(commits[:3]) or sha[:12]})", path, n, t))
    blobs = len({f.split(os.sep)[0] for f, *_ in past})
    if bad:
        print("Secrets committed (review them; a real one must be revoked, then removed "
              "from history):")
        for where, f, n, t in bad:
            print(f"  {where}: {f}:{n}: {t}")
        return 1
    print(f"secrets: none in {len(tracked(top))} tracked files or in the history "
          f"(findings in {blobs} blobs, all reviewed fixtures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
