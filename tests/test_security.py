"""Security probes (issue 17), replayed against the real system: each test runs what an unfriendly local user did
and fails if the probe succeeds. Organised by probe; add a new probe as a new section.

Dashboard (a real `fraud-nb dashboard` on the test session's stack; the guards are explained in nbs/18_dashboard.ipynb):
- hostile websocket clients, all at once for 60 s: a client without the v1 kernel-websocket subprotocol (it used to
  freeze the server: Voila parsed legacy frames as v1 and looped), a v1 client that asks for the widgets' full state
  again and again and never reads, a v1 client sending a forged frame header, and a flood of 50 websockets and 50 page
  loads. `/healthz` must answer within 1 s every second and the server's RSS grow less than 50 MB;
- simultaneous visitors: 15 page loads fired together never start more kernels than the cap;
- page lifetime: a page whose browser stays connected still ends (it says so) and frees its slot.
"""
import base64, json, os, re, socket, threading, time, urllib.error, urllib.request, uuid
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from fraud_nb.dashboard import MAX_SEND_BUFFER, MAX_SOCKETS, V1
from fraud_nb.procs import wait_until
from test_dashboard import ScorerSim, _get, _kernels, start_dashboard, stop_dashboard

# ---------------------------------------------------------------------------------------------------
# Dashboard: helpers

WS = dict(proxy=None, compression=None, ping_interval=None, max_size=None, open_timeout=10, close_timeout=1)


def open_page(url: str) -> str:
    "Load the page as a browser would; the id of its kernel."
    status, html = _get(url, timeout=120)
    assert status == 200
    return re.search(r'"kernelId": "([0-9a-f-]{36})"', html).group(1)


def channels(url: str, kid: str) -> str:
    "The page's kernel websocket URL, with a session of its own (a second socket of one session replaces the first)."
    return url.replace('http://', 'ws://') + f'api/kernels/{kid}/channels?session_id={uuid.uuid4().hex}'


def v1_frame(channel: str, msg_type: str, content: dict, metadata: dict | None = None) -> bytes:
    "A client message in the v1 framing (what the page's JavaScript sends)."
    from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1
    header = {'msg_id': f'probe-{time.monotonic_ns()}', 'msg_type': msg_type, 'username': 'probe', 'session': 'probe',
              'date': '2026-11-30T00:00:00Z', 'version': '5.3'}
    return serialize_msg_to_ws_v1([json.dumps(p).encode() for p in (header, {}, metadata or {}, content)], channel)


def kernel_processes(pid: int) -> int:
    "Page kernels running under the server `pid`."
    try: kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess: return 0
    n = 0
    for k in kids:
        try: n += any('ipykernel' in a for a in k.cmdline())
        except psutil.Error: pass
    return n


class Watch:
    "Polls `/healthz` every second (latency, failures) and the server's RSS, in a thread, until stopped."
    def __init__(self, url: str, pid: int):
        self.url, self.proc, self.stop_event = url, psutil.Process(pid), threading.Event()
        self.base_rss, self.latencies, self.failures, self.rss = self.proc.memory_info().rss, [], [], []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try: _get(self.url + 'healthz', 'application/json', timeout=5); self.latencies.append(time.monotonic() - t0)
            except Exception as e: self.failures.append(repr(e)); self.latencies.append(time.monotonic() - t0)
            self.rss.append(self.proc.memory_info().rss)
            if self.rss[-1] - self.base_rss > 500 * 2**20: break       # runaway: no need to watch it eat the host
            self.stop_event.wait(max(0.0, 1.0 - (time.monotonic() - t0)))

    def __enter__(self): self.thread.start(); return self
    def __exit__(self, *exc): self.stop_event.set(); self.thread.join(10)
    @property
    def growth_mb(self) -> float: return (max(self.rss) - self.base_rss) / 2**20


# ---------------------------------------------------------------------------------------------------
# Dashboard: the clients of the probes. Each runs until `deadline` and returns what it saw.

def non_v1_client(url: str, kid: str, deadline: float) -> dict:
    "Connects without the v1 subprotocol and stays connected, reconnecting whenever refused or dropped."
    seen = {'refused': [], 'connected': 0}
    while time.monotonic() < deadline:
        try:
            with connect(channels(url, kid), **WS) as ws:
                seen['connected'] += 1
                while time.monotonic() < deadline: ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        except InvalidStatus as e: seen['refused'].append(e.response.status_code)
        except Exception: pass
        time.sleep(1)
    return seen


def raw_v1_socket(url: str, kid: str, rcvbuf: int = 4096) -> socket.socket:
    "A v1 kernel websocket on a bare socket with a small receive buffer: after the handshake, nothing is read."
    port = int(url.rsplit(':', 1)[1].strip('/'))
    sock = socket.socket(); sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf); sock.settimeout(10)
    sock.connect(('127.0.0.1', port))
    sock.sendall(f'GET /api/kernels/{kid}/channels?session_id={uuid.uuid4().hex} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n'
                 f'Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n'
                 f'Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {V1}\r\n\r\n'.encode())
    head = b''
    while not head.endswith(b'\r\n\r\n') and len(head) < 4096: head += sock.recv(1)     # not a byte beyond the handshake
    assert head.startswith(b'HTTP/1.1 101'), head
    return sock


def masked(payload: bytes) -> bytes:
    "A client's binary websocket frame."
    n, mask = len(payload), os.urandom(4)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, 'big')
    return b'\x82' + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def non_reading_client(url: str, kid: str, deadline: float) -> dict:
    "A v1 client that asks for every widget's state (~80 kB with the images) 20 times a second and never reads the replies."
    sock, t0 = raw_v1_socket(url, kid), time.monotonic()
    seen = {'sent': 0, 'dropped_after_s': None}
    try:
        sock.sendall(masked(v1_frame('shell', 'comm_open', {'comm_id': 'probe-control', 'target_name': 'jupyter.widget.control', 'data': {}},
                                     {'version': '1.0.0'})))
        while time.monotonic() < deadline:
            sock.sendall(masked(v1_frame('shell', 'comm_msg', {'comm_id': 'probe-control', 'data': {'method': 'request_states'}})))
            seen['sent'] += 1
            time.sleep(0.05)
    except OSError: seen['dropped_after_s'] = round(time.monotonic() - t0, 1)
    finally: sock.close()
    return seen


def forged_frame_client(url: str, kid: str, deadline: float) -> dict:
    "Every 5 s: a v1 connection that sends one frame claiming 2**60 parts (jupyter_server's reader used to loop on it)."
    seen = {'sent': 0, 'closed_by_server': 0}
    while time.monotonic() < deadline:
        try:
            with connect(channels(url, kid), subprotocols=[V1], **WS) as ws:
                ws.send((2**60).to_bytes(8, 'little') + b'\0' * 64); seen['sent'] += 1
                try:
                    while True: ws.recv(timeout=5)
                except TimeoutError: pass
                except Exception: seen['closed_by_server'] += 1
        except Exception: pass
        time.sleep(max(0.0, min(5.0, deadline - time.monotonic())))
    return seen


def flood(url: str, kid: str, n: int = 50) -> dict:
    "`n` v1 websockets to one page and `n` page loads, all in parallel."
    def ws_once(_):
        try:
            with connect(channels(url, kid), subprotocols=[V1], **WS): time.sleep(10); return 101
        except InvalidStatus as e: return e.response.status_code
        except Exception as e: return repr(e)
    def page_once(_):
        try: return _get(url, timeout=120)[0]
        except urllib.error.HTTPError as e: return e.code
        except Exception as e: return repr(e)
    with ThreadPoolExecutor(2 * n) as ex:
        ws, pages = ex.map(ws_once, range(n)), ex.map(page_once, range(n))
        return {'ws': sorted(map(str, ws)), 'pages': sorted(map(str, pages))}


def tally(xs) -> dict: return {x: xs.count(x) for x in sorted(set(xs))}


# ---------------------------------------------------------------------------------------------------
# Dashboard: hostile websocket clients

def test_hostile_websocket_clients(settings):
    "60 s of a non-v1 client, a non-reading v1 client, forged frames and a connection flood: /healthz < 1 s, RSS < +50 MB."
    p, url = start_dashboard(settings, '--max-kernels', '4', '--orphan-timeout', '300', '--cull-interval', '5')
    sim = ScorerSim(settings.database_url, rate=100, label_delay=1.0).start(seconds=90)   # charts that change: image buffers flow
    try:
        kid_a, kid_b = open_page(url), open_page(url)
        with Watch(url, p.pid) as watch, ThreadPoolExecutor(4) as ex:
            deadline = time.monotonic() + 60
            non_v1 = ex.submit(non_v1_client, url, kid_a, deadline)
            non_reader = ex.submit(non_reading_client, url, kid_b, deadline)
            forged = ex.submit(forged_frame_client, url, kid_b, deadline)
            time.sleep(20)
            flooded = flood(url, kid_a)
            non_v1, non_reader, forged = non_v1.result(90), non_reader.result(90), forged.result(90)
        log = open(settings.reports_dir.parent/f'dashboard-{url.rsplit(":", 1)[1].strip("/")}.log').read()
    finally:
        sim.stop(); alive = stop_dashboard(p)
    print(f'healthz max {max(watch.latencies):.3f} s over {len(watch.latencies)} polls; RSS +{watch.growth_mb:.1f} MB; '
          f'non-v1 connected {non_v1["connected"]} refused {tally(non_v1["refused"])}; non-reader {non_reader}; forged {forged}; flood ws {tally(flooded["ws"])} pages {tally(flooded["pages"])}')
    assert not watch.failures and len(watch.latencies) >= 55, watch.failures
    assert max(watch.latencies) < 1.0, f'/healthz took {max(watch.latencies):.2f} s'
    assert watch.growth_mb < 50, f'the server grew {watch.growth_mb:.0f} MB'
    # how each probe was met
    assert non_v1['connected'] == 0 and set(non_v1['refused']) == {400}, non_v1
    assert non_reader['dropped_after_s'] is not None and 'it does not read' in log, non_reader
    assert forged['sent'] >= 5 and forged['closed_by_server'] == forged['sent'] and 'malformed frame' in log, forged
    assert set(flooded['pages']) <= {'200', '503'} and flooded['pages'].count('200') <= 2, flooded['pages']
    assert set(flooded['ws']) <= {'101', '429'} and flooded['ws'].count('101') <= MAX_SOCKETS, flooded['ws']
    assert not alive, f'processes left after SIGTERM: {alive}'


# ---------------------------------------------------------------------------------------------------
# Dashboard: simultaneous visitors

def test_simultaneous_visitors_respect_the_cap(settings):
    "15 page loads fired at the same moment: at most `--max-kernels` get a page, the rest 503; never more kernels than that."
    cap, n = 4, 15
    p, url = start_dashboard(settings, '--max-kernels', str(cap), '--orphan-timeout', '300')
    most, stop = {'processes': 0, 'healthz': 0}, threading.Event()
    def sample():
        while not stop.is_set():
            most['processes'] = max(most['processes'], kernel_processes(p.pid))
            try: most['healthz'] = max(most['healthz'], _kernels(url))
            except Exception: pass
            stop.wait(0.05)
    gate = threading.Barrier(n)
    def visit(_):
        gate.wait(30)
        try: return _get(url, timeout=180)[0]
        except urllib.error.HTTPError as e: return e.code
    sampler = threading.Thread(target=sample, daemon=True); sampler.start()
    try:
        with ThreadPoolExecutor(n) as ex: statuses = list(ex.map(visit, range(n)))
        most['processes'] = max(most['processes'], kernel_processes(p.pid))
        final = _kernels(url)
    finally:
        stop.set(); sampler.join(10); alive = stop_dashboard(p)
    print(f'{n} simultaneous visits, cap {cap}: statuses {tally(statuses)}, most kernel processes {most["processes"]}, '
          f'most kernels in /healthz {most["healthz"]}, kernels after {final}')
    assert tally(statuses) == {200: cap, 503: n - cap}
    assert most['processes'] <= cap and most['healthz'] <= cap and final == cap
    assert not alive


# ---------------------------------------------------------------------------------------------------
# Dashboard: page lifetime

def test_a_page_that_stays_open_ends_and_frees_its_slot(settings):
    "One slot, held by a page whose browser stays connected: the next visitor gets 503 until the page's lifetime ends it."
    lifetime = 20
    p, url = start_dashboard(settings, '--max-kernels', '1', '--page-lifetime', str(lifetime), '--orphan-timeout', '300',
                             '--cull-interval', '1')
    try:
        t0 = time.monotonic()
        kid = open_page(url)
        ended, closed = None, None
        with connect(channels(url, kid), subprotocols=[V1], **WS) as ws:      # a browser that stays
            with pytest.raises(urllib.error.HTTPError) as e: _get(url, timeout=60)
            assert e.value.code == 503                                        # the slot is held
            try:
                while time.monotonic() - t0 < lifetime + 60:
                    if b'session ended after' in ws.recv(timeout=5) and ended is None: ended = time.monotonic() - t0
            except TimeoutError: pass
            except Exception: closed = time.monotonic() - t0                  # the server shut the kernel down
        wait_until(lambda: _kernels(url) == 0, 30, 'the ended page kernel shut down', interval=0.5)
        assert open_page(url)                                                 # the slot is free again
    finally:
        alive = stop_dashboard(p)
    print(f'page lifetime {lifetime} s: "session ended" at {ended} s, socket closed at {closed} s after the page load')
    assert ended is not None and lifetime - 5 < ended < lifetime + 10, ended
    assert closed is not None and ended < closed < lifetime + 30, closed
    assert not alive


# ---------------------------------------------------------------------------------------------------
# Forged label (issue 17 items 4-5): with FRAUD_NB_LABEL_SECRETS set, a forged, an unsigned and an unknown-source label
# land in the labels dead-letter topic with their reasons and not in `labels`. That probe runs once, in
# tests/test_label_provenance.py::test_refused_labels_go_to_the_labels_dlq (importing it here ran it twice per CI run);
# the embedded stack's own secrets (generated by `up`) are probed in tests/test_operations.py.
