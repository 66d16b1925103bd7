#!/bin/sh
# Health checks of the fraud_nb containers (docker-compose.yml). The image has no curl, so they are
# a few lines of Python. Exit 0 when healthy, 1 when not, with one line saying why.
#
#   healthcheck.sh http URL            healthy when GET URL answers 2xx/3xx within 5 s
#   healthcheck.sh tcp HOST PORT       healthy when a TCP connection to HOST:PORT opens within 5 s
#   healthcheck.sh process WORD...     healthy when a live process (not this check) has an argv in which
#                                      an element named WORD[0] (path or bare name) is followed by
#                                      WORD[1:] in order, e.g. `process fraud-nb score`
set -eu
exec python - "$@" <<'EOF'
import os, socket, sys, urllib.error, urllib.request
from pathlib import Path

def http(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r: code = r.status
    except urllib.error.HTTPError as e: code = e.code
    except OSError as e: return f'GET {url}: {e}'
    return None if 200 <= code < 400 else f'GET {url}: HTTP {code}'

def tcp(host, port):
    try: socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e: return f'connect {host}:{port}: {e}'

def _matches(argv, words):
    for i, a in enumerate(argv):
        if os.path.basename(a) == words[0]:
            rest = iter(argv[i + 1:])
            if all(w in rest for w in words[1:]): return True
    return False

def process(*words):
    if not words: return 'process: give the words to look for'
    me = {os.getpid(), os.getppid()}
    for p in Path('/proc').glob('[0-9]*'):
        try:
            if int(p.name) in me: continue
            if p.joinpath('stat').read_text().rsplit(')', 1)[1].split()[0] in ('Z', 'X'): continue
            argv = [a.decode(errors='replace') for a in p.joinpath('cmdline').read_bytes().split(b'\0') if a]
        except (OSError, IndexError): continue  # the process ended meanwhile
        if _matches(argv, words): return None
    return f'no live process runs {" ".join(words)}'

checks = {'http': http, 'tcp': tcp, 'process': process}
if len(sys.argv) < 2 or sys.argv[1] not in checks:
    sys.exit(f'usage: healthcheck.sh {{{"|".join(checks)}}} ARGS...')
try: problem = checks[sys.argv[1]](*sys.argv[2:])
except TypeError as e: problem = f'{sys.argv[1]}: {e}'
if problem:
    print(f'unhealthy: {problem}')
    sys.exit(1)
print('healthy')
EOF
