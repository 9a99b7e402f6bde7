#!/usr/bin/env python3
"""Print deb822 `deb-src` stanzas mirroring this machine's own apt sources.

The stack builds Kubernetes from Debian's source package. Rather than name a
mirror host, it asks for source packages from the same archives the machine
already installs binaries from (its mirror, its proxy settings, its keys):
every enabled `deb` entry of /etc/apt/sources.list and
/etc/apt/sources.list.d/*.{list,sources} whose suite belongs to the running
release (VERSION_CODENAME in /etc/os-release) becomes a `deb-src` stanza.

Usage: deb-src-from-apt.py [APT_ETC]   (default /etc/apt; output on stdout)
Exit status 1, with a message, when no entry qualifies.
"""
import glob
import os
import sys

etc = sys.argv[1] if len(sys.argv) > 1 else "/etc/apt"


def codename():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("VERSION_CODENAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return ""


def deb822_stanzas(path):
    stanza, key = {}, None
    with open(path) as f:
        for raw in f.read().splitlines() + [""]:
            if raw.startswith("#"):
                continue
            if not raw.strip():
                if stanza:
                    yield stanza
                stanza, key = {}, None
            elif raw[0] in " \t" and key:
                stanza[key] += "\n" + raw
            elif ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip()
                stanza[key] = value.strip()


def one_line_entries(path):
    with open(path) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            options = {}
            if words and words[0].startswith("["):
                opts = []
                while words:
                    w = words.pop(0)
                    opts.append(w.strip("[]"))
                    if w.endswith("]"):
                        break
                for o in opts:
                    if "=" in o:
                        k, v = o.split("=", 1)
                        options[k] = v
            if len(words) >= 2:
                stanza = {"Types": "deb", "URIs": words[0], "Suites": words[1],
                          "Components": " ".join(words[2:])}
                if "signed-by" in options:
                    stanza["Signed-By"] = options["signed-by"]
                yield stanza


release = codename()
entries = []
lists = [os.path.join(etc, "sources.list")] + sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.list")))
for path in lists:
    if os.path.isfile(path):
        entries.extend(one_line_entries(path))
for path in sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.sources"))):
    entries.extend(deb822_stanzas(path))

out = []
for s in entries:
    if "deb" not in s.get("Types", "").split():
        continue
    if s.get("Enabled", "yes").lower() == "no":
        continue
    suites = [x for x in s.get("Suites", "").split() if not release or x.split("-")[0] == release]
    if not suites:
        continue
    lines = ["Types: deb-src", "URIs: " + s["URIs"], "Suites: " + " ".join(suites)]
    for k in ("Components", "Signed-By", "Trusted", "Architectures"):
        if s.get(k):
            lines.append(f"{k}: {s[k]}")
    out.append("\n".join(lines))

if not out:
    sys.exit(f"no enabled 'deb' entry for release '{release}' in {etc}/sources.list[.d]: "
             "cannot derive deb-src entries to fetch the Kubernetes source")
print("\n\n".join(out))
